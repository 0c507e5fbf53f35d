"""The observed depth weights of the input-dependent schemes (`Connection.observes_weights`,
stack.observed_depth_weights): what the training loop and the sweep plot for them, the mean
over the validation tokens of the weights each sub-layer input gives its sources.

* At init they are the schemes' known initial weights (MUDDFormer: one-hot on the newest
  output; DCA: b = 1, w = 0, so 1 on every earlier output; Attention Residuals: uniform).
* With the weights moved off init they equal the same means computed in numpy from the
  activations of torch_ref's literal forward (its weight functions / inputs recorded as it
  runs; torch_ref itself is unchanged): an independent computation.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from llama_testlib import (FP32_RTOL, assert_close, jax_fns, random_ids, random_model, tiny_config,
                           to_jax_params)
from torch_ref.modeling import peers

L, SEQ = 4, 11
VARIANTS = (("mudd", {}), ("mudd", {"mudd_streams": "qv"}), ("dca", {}), ("dca", {"dca_k": 1}),
            ("attn_res", {}), ("attn_res", {"attn_res_blocks": 2}))


def variant_id(variant) -> str:
    method, knobs = variant
    return "-".join([method, *(f"{k}={v}" for k, v in knobs.items())])


_OBSERVE: dict = {}


def jax_observed(method: str, knobs: dict, params, ids) -> np.ndarray:
    """JAX's observed mean depth weights of params on ids [b, s]."""
    key = (method, tuple(sorted(knobs.items())))
    if key not in _OBSERVE:
        cfg, model, _, _ = jax_fns(method, **knobs)
        _OBSERVE[key] = jax.jit(lambda p, ids: model.apply({"params": p}, ids, method=type(model).observed_depth_weights))
    return np.asarray(_OBSERVE[key](params, ids))


def initial_weights(method: str, knobs: dict) -> np.ndarray:
    """The known init, written from the papers' initialisations (docs/maths.md C5 - C7)."""
    if method == "mudd":  # row l: b_l one-hot on X_{l+1}
        return np.eye(L, L + 1, k=1)
    if method == "dca":  # row l: b = 1 on z_0 .. z_l, relu(0 . rmsnorm(z_j)) = 0
        return np.tri(L, L + 1)
    size = 1 if not knobs else 2 * L // knobs["attn_res_blocks"]
    rows = []
    for k in range(1, 2 * L + 1):  # the input after sub-layer k-1: uniform over its sources
        complete, partial = divmod(k, size)
        count = 1 + complete + (1 if partial else 0)  # b_0, the completed blocks, the partial sum
        rows.append(np.where(np.arange(2 * L // size + 1) < count, 1.0 / count, 0.0))
    return np.stack(rows)


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_observed_weights_at_init_are_the_known_init(variant):
    method, knobs = variant
    cfg, model, _, _ = jax_fns(method, **knobs)
    assert cfg.scheme.observes_weights(cfg)
    ids = random_ids(tiny_config(**knobs), SEQ, seed=3).numpy()
    params = jax.jit(model.init)(jax.random.PRNGKey(0), ids)["params"]
    observed = jax_observed(method, knobs, params, ids)
    np.testing.assert_allclose(observed, initial_weights(method, knobs), rtol=FP32_RTOL, atol=0)


# ----------------------------------------------------------------------------- against torch_ref's activations


def rms_hat(x, eps):
    return x / np.sqrt(np.mean(x**2, -1, keepdims=True) + eps)


def mudd_expected(calls, config, knobs) -> np.ndarray:
    """Row l: the plotted stream's A_l (R, or the first dense stream) averaged over tokens."""
    streams = knobs.get("mudd_streams", "qkvr")
    c = streams.index("r") if "r" in streams else 0
    rows = np.zeros((L, L + 1))
    for l, weights in enumerate(calls):  # mudd_weights(layer, x, l, config) -> [C, b, s, l+2]
        rows[l, :l + 2] = weights.detach().numpy()[c].mean(axis=(0, 1))
    return rows


def dca_expected(calls, config, knobs) -> np.ndarray:
    """Row l: relu(w_Q . rmsnorm(z_j)) + b_{Q,j} over tokens and the h channels (k-DCA's summed
    entries 1), from the layer outputs z_j the query GRN reads."""
    rows = np.zeros((L, L + 1))
    for layer, c, outputs, l in calls:
        if c != 0:
            continue
        weighted, summed = peers.grn_entries(l, config)
        w, b = (getattr(layer, name).detach().numpy()[c] for name in ("dca_w", "dca_bias"))
        for j in summed:
            rows[l, j] = 1.0
        for j in weighted:
            rows[l, j] = np.maximum(rms_hat(outputs[j].numpy(), config.rms_norm_eps) @ w, 0).mean() + b[j].mean()
    return rows


def attn_res_expected(calls, config, knobs) -> np.ndarray:
    """Row k: softmax_i(wᵀ RMSNorm(v_i)) over tokens; the values are the completed blocks and the
    partial sum, whose index in the list is its block's."""
    columns = 2 * L + 1 if not knobs else knobs["attn_res_blocks"] + 1
    rows = np.zeros((len(calls), columns))
    for k, (query, values) in enumerate(calls):
        logits = np.stack([rms_hat(v.numpy(), config.rms_norm_eps) @ query.detach().numpy() for v in values])
        weights = np.exp(logits - logits.max(0))
        rows[k, :len(values)] = (weights / weights.sum(0)).mean(axis=(1, 2))
    return rows


def spy(monkeypatch, method: str) -> list:
    """Record what torch_ref's forward computes its depth weights from, as it runs."""
    calls = []
    if method == "mudd":
        original = peers.mudd_weights
        monkeypatch.setattr(peers, "mudd_weights", lambda *a: calls.append(original(*a)) or calls[-1])
    elif method == "dca":
        original = peers.grn
        monkeypatch.setattr(peers, "grn", lambda layer, c, outputs, l, config:
                            calls.append((layer, c, list(outputs), l)) or original(layer, c, outputs, l, config))
    else:
        original = peers.depth_attention
        monkeypatch.setattr(peers, "depth_attention", lambda query, values, eps:
                            calls.append((query, list(values))) or original(query, values, eps))
    return calls


EXPECTED = {"mudd": mudd_expected, "dca": dca_expected, "attn_res": attn_res_expected}


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_observed_weights_match_torch_ref_activations(variant, monkeypatch):
    import torch

    method, knobs = variant
    config = tiny_config(**knobs)
    model = random_model(config, method, seed=1)  # connection weights moved off their init
    ids = random_ids(config, SEQ, seed=2)
    calls = spy(monkeypatch, method)
    with torch.no_grad():
        model(ids)
    expected = EXPECTED[method](calls, config, knobs)

    cfg, _, _, _ = jax_fns(method, **knobs)
    observed = jax_observed(method, knobs, to_jax_params(model.state_dict(), cfg), ids.numpy())
    assert observed.shape == expected.shape
    assert_close(observed, expected, FP32_RTOL, f"observed depth weights {variant_id(variant)}")
    assert np.abs(expected - initial_weights(method, knobs)).max() > 0.05  # off init: the test can fail
    if method == "attn_res":  # convex weights
        np.testing.assert_allclose(observed.sum(axis=1), 1.0, rtol=1e-6)


def test_a_scheme_with_static_weights_is_not_observed():
    """Static depth weights are plotted from the parameters (`learned_matrix`); asking for observed
    ones is a clear error."""
    cfg, model, _, _ = jax_fns("mudd", mudd_static=True)
    assert not cfg.scheme.observes_weights(cfg)
    ids = random_ids(tiny_config(), SEQ, seed=3).numpy()
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), ids)["params"]
    with pytest.raises(ValueError, match="mudd: its depth weights do not depend on the tokens"):
        jax.eval_shape(lambda p: model.apply({"params": p}, ids, method=type(model).observed_depth_weights), params)
