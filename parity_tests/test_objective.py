"""The training objective and the evaluation, against torch_ref: what the train step and the
eval step compute on batches of the real data pipeline (jax_residual.train.data) equals
torch_ref's `ResidualLlamaForCausalLM` on the same weights and windows with the next-token
cross-entropy written in llama_testlib (`logits[:, :-1]` against `ids[:, 1:]`), and the
per-position loss the step differentiates is causal.

The train step is the jitted `make_train_step` itself, with grad accumulation off
and on, run with an "optimiser" that leaves the parameters alone and keeps the gradients it was handed as
its state, so the gradients are read back exactly as the step computed them.

Tolerances: fp32 on both sides, FP32_RTOL for losses, GRAD_RTOL for gradients (llama_testlib
says why); the causality checks are exact (a masked probability is exactly 0).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from jax_residual import LlamaForCausalLM, prepare, sharding
from jax_residual.data import shards
from jax_residual.data.tokenizer import VOCAB_SIZE
from jax_residual.train import data, step
from llama_testlib import stdlib_corpus
from llama_testlib import (FP32_RTOL, GRAD_RTOL, assert_close, assert_trees_close, jax_config, random_model,
                           tiny_config, to_jax_params, torch_forward_backward)

SEQ = 12  # windows of SEQ + 1 bytes
BATCH = 6  # 6 windows: with accumulation, 3 micro-batches of 2 (unequal axes catch a wrong divisor)
METHODS = ("standard", "method1", "method4.2", "method5.5")  # none, re-run MLP, re-run attention (learned), scores


def byte_config(method: str):
    """(HF config, JAX ModelConfig): the tiny test model (3 layers) over the byte vocabulary."""
    hf = tiny_config(layers=3, vocab_size=VOCAB_SIZE, max_position_embeddings=SEQ + 4)
    return hf, jax_config(hf, method)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> shards.PreparedCorpus:
    """A folder corpus of 8 standard-library sources, prepared and split by the real pipeline."""
    folder = stdlib_corpus(tmp_path_factory.mktemp("objective_corpus"), validation=2, train=6)
    out = tmp_path_factory.mktemp("objective_prepared") / "prepared"
    prepare.prepare(str(folder), out, prepare.Settings(prepare.source_name(str(folder)), "bytes"), log=lambda _: None)
    return shards.open_prepared(out)


def one_device_mesh():
    return sharding.make_mesh("data=1", jax.devices()[:1])


def gradient_recorder() -> optax.GradientTransformation:
    """An optimiser whose update is zero and whose state is the last gradients it was given."""
    return optax.GradientTransformation(
        init=lambda params: jax.tree.map(jnp.zeros_like, params),
        update=lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads))


def torch_reference(model, windows: np.ndarray):
    """(loss, {state-dict key: gradient}) of torch_ref on all windows int [n, s + 1] as one batch."""
    loss, _, grads = torch_forward_backward(model, torch.from_numpy(windows.astype(np.int64)))
    return loss, grads


# Accumulation on for every family; off for the cheapest two (the same code with one micro-batch).
STEP_CASES = [(method, 3) for method in METHODS] + [("standard", 1), ("method5.5", 1)]


@pytest.mark.parametrize("method, grad_accum", STEP_CASES)
def test_train_step_loss_and_grads_match_torch(method, grad_accum, corpus):
    hf, cfg = byte_config(method)
    model_t = random_model(hf, method, seed=7)  # learnable method weights moved off their init
    batch = data.train_batch(corpus.train, seed=3, index=11, batch_size=BATCH, seq_len=SEQ, grad_accum=grad_accum)
    loss_t, grads_t = torch_reference(model_t, batch.reshape(BATCH, SEQ + 1))

    mesh, tx = one_device_mesh(), gradient_recorder()
    shardings, _ = step.state_shardings(mesh, cfg, tx, SEQ)
    state = step.init_state(step.place_params(to_jax_params(model_t.state_dict(), cfg), shardings.params), tx,
                            shardings)
    batch = data.global_batch_array(batch, step.stacked_batch_sharding(mesh), 1)
    train_step = step.make_train_step(LlamaForCausalLM(cfg, mesh=mesh), tx, shardings, mesh)
    state, metrics = train_step(state, batch)

    expected = to_jax_params(grads_t, cfg)
    what = f"train step {method} accum={grad_accum}"
    assert_close(metrics["loss"], loss_t, FP32_RTOL, f"{what} loss")
    assert_trees_close(state.opt_state, expected, GRAD_RTOL, f"{what} grads")
    global_norm = np.sqrt(sum(np.sum(np.square(g, dtype=np.float64)) for g in jax.tree.leaves(expected)))
    assert_close(metrics["grad_norm"], global_norm, GRAD_RTOL, f"{what} grad norm")
    assert int(state.step) == 1


def test_eval_step_matches_torch_on_the_validation_windows(corpus):
    hf, cfg = byte_config("method5.5")
    model_t = random_model(hf, "method5.5", seed=8)
    batches = data.validation_batches(corpus.validation, count=2, batch_size=3, seq_len=SEQ)
    loss_t, _ = torch_reference(model_t, batches.reshape(-1, SEQ + 1))

    mesh = one_device_mesh()
    shardings, _ = step.state_shardings(mesh, cfg, gradient_recorder(), SEQ)
    params = to_jax_params(model_t.state_dict(), cfg)
    eval_step = step.make_eval_step(LlamaForCausalLM(cfg, mesh=mesh), shardings.params, mesh)
    loss_j = eval_step(params, data.global_batch_array(batches, step.stacked_batch_sharding(mesh), 1))
    assert_close(loss_j, loss_t, FP32_RTOL, "eval step method5.5 loss")


def changed_after(windows: np.ndarray, position: int, seed: int) -> np.ndarray:
    """windows with every token after `position` replaced by a different byte."""
    changed = windows.copy()
    shift = np.random.default_rng(seed).integers(1, VOCAB_SIZE, changed[:, position + 1:].shape)
    changed[:, position + 1:] = (changed[:, position + 1:] + shift) % VOCAB_SIZE
    return changed


@pytest.mark.parametrize("method", ["standard", "method2", "method5.2"])
def test_per_position_loss_is_causal(method, corpus):
    """token_losses[:, t] (what the train step averages and differentiates) predicts token t + 1
    from tokens <= t: changing the tokens after t + 1 leaves positions <= t bit-identical, and
    changes position t + 1, whose target changed (so the loss does read its targets)."""
    hf, cfg = byte_config(method)
    params = to_jax_params(random_model(hf, method, seed=9).state_dict(), cfg)
    model = LlamaForCausalLM(cfg)
    losses_fn = jax.jit(lambda p, tokens: step.token_losses(p, model, tokens))
    windows = data.train_batch(corpus.train, seed=4, index=2, batch_size=2, seq_len=SEQ, grad_accum=1)[0]
    losses = np.asarray(losses_fn(params, windows))
    assert losses.shape == (2, SEQ)
    for t in (0, 5, SEQ - 2):
        changed = np.asarray(losses_fn(params, changed_after(windows, t + 1, seed=t)))
        assert np.array_equal(changed[:, : t + 1], losses[:, : t + 1]), (
            f"{method}: the loss at positions <= {t} changed when tokens after {t + 1} changed")
        assert np.all(changed[:, t + 1] != losses[:, t + 1]), (
            f"{method}: the loss at position {t + 1} did not change when its target (token {t + 2}) changed")
