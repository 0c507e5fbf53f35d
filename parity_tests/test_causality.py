"""docs/maths.md B3: for every method (and every published scheme, docs/maths.md C), logits at position t do not
depend on tokens after t.

Both checks are exact (no tolerance): a masked probability is exactly 0, so the logits at
positions <= t are bit-identical when later tokens change, and the gradient of those logits
w.r.t. later input embeddings is exactly 0. Each test also asserts the opposite direction
(later logits do change, earlier embeddings do get gradient), so it cannot pass vacuously.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llama_testlib import (METHODS, SCHEME_VARIANTS, SEQ_LENS, jax_fns, jax_forward, random_ids, random_model,
                           require_jax_model, tiny_config, to_jax_params)

SEQ = SEQ_LENS[-1]
CUTS = (0, 4, SEQ - 2)  # t: the last position whose logits must not see the change
VARIANTS = [(method, {}) for method in METHODS] + list(SCHEME_VARIANTS)  # (method, scheme knobs)
IDS = ["-".join([m, *(f"{k}={v}" for k, v in knobs.items())]) for m, knobs in VARIANTS]


def changed_after(ids: torch.Tensor, t: int, vocab_size: int, seed: int) -> torch.Tensor:
    """ids with every token after position t replaced by a different token."""
    shift = torch.randint(1, vocab_size, ids[:, t + 1:].shape, generator=torch.Generator().manual_seed(seed))
    changed = ids.clone()
    changed[:, t + 1:] = (ids[:, t + 1:] + shift) % vocab_size
    return changed


def projection_weights(shape, t: int, seed: int) -> np.ndarray:
    """Random weights [b, s, v] on the logits at positions <= t, zero after."""
    weights = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    weights[:, t + 1:] = 0.0
    return weights


def check_token_change(logits, changed_logits, t: int):
    assert np.array_equal(changed_logits[:, : t + 1], logits[:, : t + 1]), (
        f"logits at positions <= {t} changed by "
        f"{np.abs(changed_logits[:, : t + 1] - logits[:, : t + 1]).max():.3g} when later tokens changed")
    assert np.abs(changed_logits[:, t + 1:] - logits[:, t + 1:]).max() > 1e-3  # the change was seen later on


def check_embedding_grad(grad, t: int):
    grad = np.asarray(grad)
    leak = np.abs(grad[:, t + 1:]).max()
    assert leak == 0.0, f"d logits[<= {t}] / d embeds[> {t}] is not zero: max {leak:.3g}"
    assert np.all(np.abs(grad[:, : t + 1]).max(axis=-1) > 0)  # every earlier position does matter


@pytest.mark.parametrize("method, knobs", VARIANTS, ids=IDS)
def test_torch_causal_token_change(method, knobs):
    config = tiny_config(**knobs)
    model = random_model(config, method, seed=20)
    ids = random_ids(config, SEQ, seed=21)
    with torch.no_grad():
        logits = model(ids).numpy()
        for t in CUTS:
            check_token_change(logits, model(changed_after(ids, t, config.vocab_size, seed=t)).numpy(), t)


@pytest.mark.parametrize("method, knobs", VARIANTS, ids=IDS)
def test_torch_causal_embedding_jacobian(method, knobs):
    config = tiny_config(**knobs)
    model = random_model(config, method, seed=22)
    ids = random_ids(config, SEQ, seed=23)
    embeds = model.model.embed_tokens(ids).detach().requires_grad_(True)
    logits = model(inputs_embeds=embeds)
    for t in CUTS:
        weights = torch.from_numpy(projection_weights(logits.shape, t, seed=t))
        (grad,) = torch.autograd.grad((logits * weights).sum(), embeds, retain_graph=True)
        check_embedding_grad(grad.numpy(), t)


@pytest.mark.parametrize("method, knobs", VARIANTS, ids=IDS)
def test_jax_causal_token_change(method, knobs):
    require_jax_model()
    config = tiny_config(**knobs)
    model = random_model(config, method, seed=20)
    ids = random_ids(config, SEQ, seed=21)
    cfg, forward = jax_forward(method, **knobs)  # no gradient: 1 compile
    params = to_jax_params(model.state_dict(), cfg)

    def logits_of(token_ids):
        return np.asarray(forward({"params": params}, token_ids.numpy()))

    logits = logits_of(ids)
    for t in CUTS:
        check_token_change(logits, logits_of(changed_after(ids, t, config.vocab_size, seed=t)), t)


@pytest.mark.parametrize("method, knobs", VARIANTS, ids=IDS)
def test_jax_causal_embedding_jacobian(method, knobs):
    """Through `model.apply({"params": p}, None, inputs_embeds=E)`."""
    require_jax_model()
    config = tiny_config(**knobs)
    model = random_model(config, method, seed=22)
    ids = random_ids(config, SEQ, seed=23)
    cfg, _, _, embeds_grad = jax_fns(method, **knobs)
    params = to_jax_params(model.state_dict(), cfg)
    embeds = model.model.embed_tokens(ids).detach().numpy()
    for t in CUTS:
        grad = embeds_grad(params, embeds, projection_weights((*ids.shape, config.vocab_size), t, seed=t))
        check_embedding_grad(grad, t)
