"""The knobs of methods 1-4 (`rerun_window`, `rerun_every`, `rerun_keep_identity`) and the remat policies:
JAX == torch_ref (logits, loss, gradients), and the knobs really change the function.

torch_ref applies the knobs literally (a Python list of the earlier layers each layer re-runs,
`torch_ref.modeling.llama.rerun_layers`); JAX masks and skips chunks of a static candidate set.
Six layers, so windows and strides leave some layers with a partial re-run and, for window 1
with every 2, some with none (they keep the standard residual). Tolerances as test_methods:
fp32, 1e-5 normwise for logits/loss, 4e-5 for gradients (GRAD_RTOL, see llama_testlib).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from llama_testlib import (
    FP32_RTOL,
    GRAD_RTOL,
    assert_close,
    assert_trees_close,
    jax_fns,
    normwise_error,
    random_ids,
    randomize_base_weights,
    randomize_method_params,
    tiny_config,
    to_jax_params,
    torch_forward_backward,
)

from jax_residual import convert
from jax_residual.connections import rerun
from jax_residual.config import ModelConfig
from torch_ref.modeling.llama import ResidualLlamaForCausalLM, rerun_layers

LAYERS = 6
CASES = [  # method, rerun_window, rerun_every, remat
    ("method1", 2, 1, "recompute"),
    ("method2", None, 2, "layer"),
    ("method3.2", 3, 2, "recompute"),
    ("method4.1", 1, 2, "none"),
    ("method3.1", None, 1, "layer"),  # no knob: the custom-VJP layer remat alone
]


KEEP_IDENTITY_CASES = [  # method, rerun_window, rerun_every, remat: an MLP-step and an attention-step method
    ("method3.2", 1, 2, "recompute"),  # layers 1 and 2 re-run none: the kept identity is not added twice
    ("method2", None, 1, "layer"),
]


def torch_model(config, method, window, every, keep_identity=False):
    model = ResidualLlamaForCausalLM(config, method, rerun_window=window, rerun_every=every,
                                     rerun_keep_identity=keep_identity)
    randomize_base_weights(model, seed=4)
    randomize_method_params(model, seed=4)
    return model


def check_against_torch(config, ids, method, window, every, remat, keep_identity=False):
    """JAX == torch_ref (logits, loss, gradients) with these knobs; returns torch's logits."""
    model = torch_model(config, method, window, every, keep_identity)
    loss_t, logits_t, grads_t = torch_forward_backward(model, ids)
    knobs = {"rerun_keep_identity": True} if keep_identity else {}
    cfg, _, value_and_grad, _ = jax_fns(method, layers=LAYERS, rerun_window=window, rerun_every=every, remat=remat,
                                        **knobs)
    (loss_j, logits_j), grads_j = value_and_grad(to_jax_params(model.state_dict(), cfg), ids.numpy())
    what = f"{method} w={window} p={every} {remat} keep_identity={keep_identity}"
    assert_close(logits_j, logits_t, FP32_RTOL, f"knobs logits {what}")
    assert_close(loss_j, loss_t, FP32_RTOL, f"knobs loss {what}")
    expected = nn.meta.unbox(convert.params_from_state_dict(grads_t, cfg))
    assert_trees_close(nn.meta.unbox(grads_j), expected, GRAD_RTOL, f"knobs grads {what}")
    return logits_t


@pytest.mark.parametrize("method, window, every, remat", CASES)
def test_knobs_match_torch_and_change_the_function(method, window, every, remat):
    config = tiny_config(layers=LAYERS)
    ids = random_ids(config, 9, seed=2)
    logits_t = check_against_torch(config, ids, method, window, every, remat)

    if (window, every) != (None, 1):  # the knob is not silently ignored (on both sides)
        full = torch_model(config, method, None, 1)
        _, logits_full, _ = torch_forward_backward(full, ids)
        assert normwise_error(logits_t, logits_full) > 1e-3


@pytest.mark.parametrize("method, window, every, remat", KEEP_IDENTITY_CASES)
def test_keep_identity_matches_torch_and_changes_the_function(method, window, every, remat):
    """rerun_keep_identity (docs/maths.md B2): H_l = X_l + a_l + sum ... / X_{l+1} = H_l + m_l + sum ..."""
    config = tiny_config(layers=LAYERS)
    ids = random_ids(config, 9, seed=2)
    kept = check_against_torch(config, ids, method, window, every, remat, keep_identity=True)
    _, replaced, _ = torch_forward_backward(torch_model(config, method, window, every), ids)
    assert normwise_error(kept, replaced) > 1e-3


def test_keep_identity_by_hand():
    """torch_ref's identity-kept layer, written out for one layer of method1 and of method2."""
    import torch

    config = tiny_config(layers=2)
    torch.manual_seed(0)
    x = torch.randn(1, 5, config.hidden_size)
    for method in ("method1", "method2"):
        model = torch_model(config, method, None, 1, keep_identity=True).model
        first, second = model.layers
        with torch.no_grad():
            x1, probs, scores = first(x, model.rotary_emb, [], [], [], [])
            out, _, _ = second(x1, model.rotary_emb, [0], [first], [probs], [scores], keep_identity=True)
            a = second.attention_sublayer(x1, model.rotary_emb)
            if method == "method1":
                h = x1 + a
                expected = h + second.mlp_sublayer(h) + first.recompute_mlp(x1, probs)
            else:
                h = x1 + a + first.recompute_attention(x1, probs)
                expected = h + second.mlp_sublayer(h)
        torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


def test_rerun_selection_by_hand():
    """The selected earlier layers, written out, on both sides."""
    expected = {  # (l, window, every) -> layers re-run
        (0, None, 1): [], (5, None, 1): [0, 1, 2, 3, 4], (5, 2, 1): [3, 4], (5, None, 2): [0, 2, 4],
        (5, 2, 2): [4], (3, 1, 2): [2], (2, 1, 2): [], (4, None, 3): [0, 3],
    }
    for (l, window, every), layers in expected.items():
        assert rerun_layers(l, window, every) == layers
        mask = rerun.rerun_layers(jnp.asarray(l), 6, window, every)
        assert np.flatnonzero(np.asarray(mask)).tolist() == layers


@pytest.mark.parametrize("overrides, message", [
    (dict(residual_method="method1", knobs={"rerun_window": 0}), "rerun_window must be None or >= 1, got 0"),
    (dict(residual_method="method2", knobs={"rerun_every": 0}), "rerun_every must be >= 1, got 0"),
    (dict(residual_method="method5.2", knobs={"rerun_window": 2}), r"rerun_window=2 does not apply to 'method5.2'; "
                                                                    r"its knobs: none"),
    (dict(residual_method="method1", num_hidden_layers=8, knobs={"rerun_every": 2}, recompute_chunk_size=3),
     "recompute_chunk_size 3 must divide the 4 layers that can be re-run"),
])
def test_bad_knobs_are_clear_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**overrides)
