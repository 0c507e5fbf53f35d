"""Decoding with a cache (jax_residual.generate): for every method and published scheme, the logits of a prompt
decoded at once and then token by token equal torch_ref's logits of the whole sequence
(fp32, FP32_RTOL), greedy generation equals a greedy loop over torch_ref's full forward pass,
and the sampling filters match a numpy rendering of their definitions.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
import torch

from jax_residual import generate as G
from jax_residual.stores import empty_cache
from llama_testlib import (FP32_RTOL, METHODS, SCHEME_VARIANTS, assert_close, jax_config,
                           jax_model_cls, random_ids, random_model, tiny_config, to_jax_params)

LAYERS, SEQ, PROMPT = 3, 11, 4


def layers_for(knobs: dict) -> int:
    """LAYERS, or the next layer count its attn_res_blocks divides (Block AttnRes: blocks of whole layers)."""
    blocks = knobs.get("attn_res_blocks") or 1
    return -(-LAYERS // blocks) * blocks


def jax_model(method: str, **knobs):
    config = tiny_config(layers=layers_for(knobs), **knobs)
    cfg = jax_config(config, method)
    return config, cfg, jax_model_cls()(cfg)


@functools.cache
def decode_fn(model):
    return jax.jit(lambda params, ids, cache: model.apply({"params": params}, ids, cache=cache))


DECODED = [(m, {}) for m in METHODS] + list(SCHEME_VARIANTS)


@pytest.mark.parametrize("method, knobs", DECODED,
                         ids=["-".join([m, *(f"{k}={v}" for k, v in knobs.items())]) for m, knobs in DECODED])
def test_cached_decoding_equals_the_full_sequence(method, knobs):
    """Prompt of 4 tokens in one call, then 7 calls of one token: every step's logits equal
    torch_ref's logits of the whole sequence at those positions."""
    config, cfg, model = jax_model(method, **knobs)
    reference = random_model(config, method, seed=2)  # learnable weights moved off their init
    ids = random_ids(config, SEQ, seed=5)
    with torch.no_grad():
        expected = reference(ids).numpy()
    params = to_jax_params(reference.state_dict(), cfg)
    decode = decode_fn(model)
    cache = empty_cache(cfg, ids.shape[0], SEQ)
    logits, cache = decode(params, ids[:, :PROMPT].numpy(), cache)
    steps = [logits]
    for t in range(PROMPT, SEQ):
        logits, cache = decode(params, ids[:, t:t + 1].numpy(), cache)
        steps.append(logits)
    assert int(cache["length"]) == SEQ
    assert_close(np.concatenate(steps, axis=1), expected, FP32_RTOL, f"cached decoding vs torch {method}")


@pytest.mark.parametrize("method", ["standard", "method1", "method4.2", "method5.5"])
def test_greedy_generation_equals_a_greedy_loop_over_torch_ref(method):
    config, cfg, model = jax_model(method)
    reference = random_model(config, method, seed=3)
    prompt = random_ids(config, PROMPT, seed=7)
    generated = np.asarray(G.generate(model, to_jax_params(reference.state_dict(), cfg), prompt.numpy(),
                                      SEQ - PROMPT, temperature=0.0))
    ids = prompt
    with torch.no_grad():
        for _ in range(SEQ - PROMPT):
            ids = torch.cat([ids, reference(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    np.testing.assert_array_equal(generated, ids.numpy())


def test_sampling_is_seeded_and_top_k_1_is_greedy():
    config, cfg, model = jax_model("method5.2")
    params = to_jax_params(random_model(config, "method5.2", seed=4).state_dict(), cfg)
    prompt = random_ids(config, PROMPT, seed=8).numpy()
    sample = functools.partial(G.generate, model, params, prompt, 6)
    first, again, other = sample(seed=1), sample(seed=1), sample(seed=2)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    np.testing.assert_array_equal(sample(top_k=1, seed=3), sample(temperature=0.0))


def test_filters_keep_the_top_k_and_the_nucleus():
    logits = np.log(np.array([[0.05, 0.4, 0.1, 0.3, 0.15]], np.float32))
    kept = lambda **kw: np.isfinite(np.asarray(G.filter_logits(logits, **kw)))[0].tolist()
    assert kept(top_k=2) == [False, True, False, True, False]
    # nucleus 0.75: 0.4 + 0.3 = 0.7 < 0.75, so the third most likely (0.15) joins; 0.8 covers it
    assert kept(top_p=0.75) == [False, True, False, True, True]
    assert kept(top_p=0.7) == [False, True, False, True, False]
    assert kept(top_p=1e-6) == [False, True, False, False, False]


@pytest.mark.parametrize("changes, message", [
    (dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
    (dict(temperature=-1.0), "temperature must be >= 0"),
    (dict(top_k=0), "top_k must be in"),
    (dict(top_p=1.5), "top_p must be in"),
    (dict(max_new_tokens=20), "exceeds max_position_embeddings"),
])
def test_bad_sampling_settings_are_rejected(changes, message):
    _, cfg, model = jax_model("standard")
    params = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 4), np.int32))["params"]
    settings = dict(max_new_tokens=3) | changes
    with pytest.raises(ValueError, match=message):
        G.generate(model, params, np.zeros((1, 4), np.int32), **settings)


def test_out_of_range_prompt_is_rejected():
    _, cfg, model = jax_model("standard")
    with pytest.raises(ValueError, match="token id 64 is out of range"):
        G.generate(model, {}, np.full((1, 2), 64), 2)
