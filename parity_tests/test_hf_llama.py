"""method="standard" is HuggingFace `transformers.LlamaForCausalLM` (docs/maths.md B0): torch_ref and the
JAX model both reproduce it from an HF state dict, GQA, tied and untied head.

HF runs eager attention in float32. Tolerance: ~1e-5 normwise relative (FP32_RTOL); the only
expected differences are float32 rounding (e.g. RoPE tables computed in another order).
"""

from __future__ import annotations

import pytest
import torch
import transformers

from llama_testlib import (FP32_RTOL, GRAD_RTOL, SEQ_LENS, assert_close, assert_trees_close, jax_fns, jax_logits,
                           random_ids, random_model, randomize_base_weights, require_jax_model, tiny_config,
                           to_jax_params, torch_forward_backward)
from torch_ref.modeling.llama import ResidualLlamaForCausalLM

TIES = (False, True)


def random_hf_model(tie: bool, seed: int = 30) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    hf = transformers.LlamaForCausalLM(tiny_config(tie=tie)).eval()
    randomize_base_weights(hf, seed)  # larger weights and non-unit norms, HF names
    if tie:
        assert hf.lm_head.weight is hf.model.embed_tokens.weight
    return hf


@pytest.mark.parametrize("seq", SEQ_LENS)
@pytest.mark.parametrize("tie", TIES)
def test_torch_ref_standard_equals_hf(tie, seq):
    hf = random_hf_model(tie)
    model = ResidualLlamaForCausalLM(tiny_config(tie=tie), "standard")
    result = model.load_state_dict(hf.state_dict(), strict=False)
    assert not result.missing_keys and not result.unexpected_keys, result
    if tie:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = random_ids(hf.config, seq, seed=31)
    with torch.no_grad():
        expected = hf(ids).logits.numpy()
        assert_close(model(ids).numpy(), expected, FP32_RTOL, f"torch-vs-hf logits tie={tie}")


@pytest.mark.parametrize("tie", TIES)
def test_torch_ref_standard_gradients_equal_hf(tie):
    hf = random_hf_model(tie)
    model = ResidualLlamaForCausalLM(tiny_config(tie=tie), "standard")
    model.load_state_dict(hf.state_dict(), strict=False)
    ids = random_ids(hf.config, SEQ_LENS[-1], seed=32)
    loss_hf, _, grads_hf = torch_forward_backward(_LogitsOnly(hf), ids)
    loss, _, grads = torch_forward_backward(model, ids)
    assert_close(loss, loss_hf, FP32_RTOL, f"torch-vs-hf loss tie={tie}")
    assert set(grads) == {k.removeprefix("inner.") for k in grads_hf}
    for key, grad in grads_hf.items():
        assert_close(grads[key.removeprefix("inner.")], grad, GRAD_RTOL, f"torch-vs-hf grads tie={tie}")


class _LogitsOnly(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, ids):
        return self.inner(ids).logits


@pytest.mark.parametrize("seq", SEQ_LENS)
@pytest.mark.parametrize("tie", TIES)
def test_jax_standard_equals_hf(tie, seq):
    require_jax_model()
    hf = random_hf_model(tie)
    ids = random_ids(hf.config, seq, seed=31)
    with torch.no_grad():
        expected = hf(ids).logits.numpy()
    assert_close(jax_logits("standard", hf.state_dict(), ids, tie=tie), expected, FP32_RTOL,
                 f"jax-vs-hf logits tie={tie}")


@pytest.mark.parametrize("method", ["standard", "method1", "method5.5"])
def test_jax_matches_torch_with_tied_head(method):
    """Tied head: the embedding's gradient is the sum of both uses. Torch's grads dict carries
    it under both keys (one shared tensor); the JAX tree has the embedding only."""
    convert = require_jax_model()
    from flax import linen as nn

    config = tiny_config(tie=True)
    model = random_model(config, method, seed=33)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = random_ids(config, SEQ_LENS[-1], seed=34)
    loss_t, logits_t, grads_t = torch_forward_backward(model, ids)
    cfg, _, value_and_grad, _ = jax_fns(method, tie=True)
    (loss_j, logits_j), grads_j = value_and_grad(to_jax_params(model.state_dict(), cfg), ids.numpy())
    assert_close(logits_j, logits_t, FP32_RTOL, f"jax-vs-torch tied logits {method}")
    assert_close(loss_j, loss_t, FP32_RTOL, f"jax-vs-torch tied loss {method}")
    expected = nn.meta.unbox(convert.params_from_state_dict(grads_t, cfg))
    assert_trees_close(nn.meta.unbox(grads_j), expected, GRAD_RTOL, f"jax-vs-torch tied grads {method}")
