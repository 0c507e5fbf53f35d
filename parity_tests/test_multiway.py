"""MUDDFormer (`mudd`) and DeepCrossAttention (`dca`), docs/maths.md C5 and C7, against computations
we did not write as JAX or torch_ref code (JAX == torch_ref, causality, decoding, export and the
identity at init are the generic tests of test_peers.py & co., over SCHEME_VARIANTS).

* No maintained package implements MUDDFormer (PyPI has none; the authors' code is a repository,
  not a package): torch_ref and JAX are compared with a hand-worked two-layer numpy model written
  from the paper's equations (Sec. 2.2-2.3): the DA module A = GELU(rmsnorm(X) W1) W2 + b and
  block l+1 reading X^Q, X^K, X^V, X^R.
* DCA's GRN-v3 is compared with the `deep-cross-attention` package (lucidrains, PyPI) on the same
  weights, and the whole model (block wiring, k-DCA's summed middle entries) with a numpy model
  of the paper's equations (Sec. 3), as for MUDDFormer.
"""

from __future__ import annotations

import math
import types

import numpy as np
import pytest
import torch

from llama_testlib import (FP32_RTOL, assert_close, jax_logits, numpy_state_dict, random_ids, random_model,
                           tiny_config)
from torch_ref.modeling import peers


class NumpyLlama:
    """The pre-norm Llama pieces of docs/maths.md B0 in float64, from a torch_ref state dict."""

    def __init__(self, state_dict, config):
        self.sd = {k: np.asarray(v, np.float64) for k, v in state_dict.items()}
        self.config, self.eps = config, config.rms_norm_eps
        self.nh, self.nkv = config.num_attention_heads, config.num_key_value_heads
        self.hd = config.hidden_size // self.nh

    def w(self, l, name):
        return self.sd[f"model.layers.{l}.{name}"]

    def rms(self, x, gamma=1.0):
        return x / np.sqrt(np.mean(x**2, -1, keepdims=True) + self.eps) * gamma

    def rope(self, x):  # [b, s, n, hd], the half-split layout
        hd, s = self.hd, x.shape[1]
        theta = (self.config.rope_parameters or {}).get("rope_theta", 10000.0)
        angles = np.arange(s)[:, None] * theta ** (-np.arange(0, hd, 2) / hd)[None]
        cos, sin = np.cos(np.concatenate([angles] * 2, -1)), np.sin(np.concatenate([angles] * 2, -1))
        return x * cos[:, None] + np.concatenate([-x[..., hd // 2:], x[..., :hd // 2]], -1) * sin[:, None]

    def attention(self, l, x_q, x_k, x_v):
        """Attn_l(N1(x_q), N1(x_k), N1(x_v)) [b, s, h]: Q, K, V each from its own input."""
        b, s, _ = x_q.shape
        gamma = self.w(l, "input_layernorm.weight")
        heads = lambda x, name, n: (self.rms(x, gamma) @ self.w(l, f"self_attn.{name}.weight").T).reshape(b, s, n, -1)
        q = self.rope(heads(x_q, "q_proj", self.nh)).transpose(0, 2, 1, 3)
        k = np.repeat(self.rope(heads(x_k, "k_proj", self.nkv)).transpose(0, 2, 1, 3), self.nh // self.nkv, 1)
        v = np.repeat(heads(x_v, "v_proj", self.nkv).transpose(0, 2, 1, 3), self.nh // self.nkv, 1)
        z = np.where(np.tril(np.ones((s, s), bool)), q @ k.swapaxes(-1, -2) / math.sqrt(self.hd), -np.inf)
        p = np.exp(z - z.max(-1, keepdims=True))
        o = (p / p.sum(-1, keepdims=True)) @ v
        return o.transpose(0, 2, 1, 3).reshape(b, s, -1) @ self.w(l, "self_attn.o_proj.weight").T

    def mlp(self, l, h):
        y = self.rms(h, self.w(l, "post_attention_layernorm.weight"))
        g, u = y @ self.w(l, "mlp.gate_proj.weight").T, y @ self.w(l, "mlp.up_proj.weight").T
        return (g / (1 + np.exp(-g)) * u) @ self.w(l, "mlp.down_proj.weight").T

    def logits(self, x):
        head = self.sd.get("lm_head.weight", self.sd["model.embed_tokens.weight"])
        return self.rms(x, self.sd["model.norm.weight"]) @ head.T


def gelu(x):
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def numpy_mudd(state_dict, config, ids):
    """MUDDFormer (paper Sec. 2.2-2.3, all four streams dense and dynamic), two layers by hand."""
    m = NumpyLlama(state_dict, config)
    x0 = m.sd["model.embed_tokens.weight"][ids]

    def da(l, outputs):
        """X^Q, X^K, X^V, X^R after block l: sum_j A[c, j] X_j, A = GELU(rmsnorm(X_{l+1}) W1) W2 + b."""
        units = 4 * (l + 2)
        hidden = gelu(m.rms(outputs[-1]) @ m.w(l, "mudd_w1")[:, :units])  # [b, s, 4 (l+2)]
        a = np.einsum("bsk,kcj->bscj", hidden, m.w(l, "mudd_w2")[:units, :, :l + 2]) + m.w(l, "mudd_bias")[:, :l + 2]
        return [sum(a[..., c, j, None] * outputs[j] for j in range(l + 2)) for c in range(4)]

    h0 = x0 + m.attention(0, x0, x0, x0)  # layer 0: every stream is X_0
    x1 = h0 + m.mlp(0, h0)
    q1, k1, v1, r1 = da(0, [x0, x1])
    h1 = r1 + m.attention(1, q1, k1, v1)
    x2 = h1 + m.mlp(1, h1)
    return m.logits(da(1, [x0, x1, x2])[3])  # the output: X^R after the last DA


def numpy_dca(state_dict, config, ids, k=None):
    """DCA (paper Sec. 3): z_0 = embeddings, block l's Q, K, V inputs from three GRN-v3 over
    z_0..z_l, z_{l+1} = a + MLP(N2(x^Q + a)); k-DCA weighs the first and last k, sums the rest."""
    m = NumpyLlama(state_dict, config)
    z = [m.sd["model.embed_tokens.weight"][ids]]
    for l in range(config.num_hidden_layers):
        w, b = m.w(l, "dca_w"), m.w(l, "dca_bias")

        def grn(c):
            out = 0.0
            for j in range(l + 1):
                if k is None or j < k or j > l - k:
                    out = out + (np.maximum(m.rms(z[j]) @ w[c], 0.0)[..., None] + b[c, j]) * z[j]
                else:
                    out = out + z[j]
            return out

        q, key, v = grn(0), grn(1), grn(2)
        a = m.attention(l, q, key, v)
        z.append(a + m.mlp(l, q + a))
    return m.logits(sum(z))


@pytest.mark.parametrize("method, knobs, layers, numpy_model", [
    ("mudd", {}, 2, numpy_mudd),
    ("dca", {}, 2, numpy_dca),
    ("dca", {"dca_k": 1}, 3, lambda sd, config, ids: numpy_dca(sd, config, ids, k=1)),  # l = 2 sums z_1
], ids=["mudd", "dca", "dca-k1"])
def test_torch_ref_and_jax_match_the_papers_equations_in_numpy(method, knobs, layers, numpy_model):
    config = tiny_config(layers=layers, **knobs)
    model = random_model(config, method, seed=3)  # connection weights moved off their init
    ids = random_ids(config, 7, seed=8)
    expected = numpy_model(numpy_state_dict(model), config, ids.numpy())
    with torch.no_grad():
        assert_close(model(ids).numpy(), expected, FP32_RTOL, f"torch_ref {method} {knobs} vs numpy")
    if not knobs:  # the JAX model of this config is compiled by the generic tests (4 layers); here 2
        assert_close(jax_logits(method, model.state_dict(), ids, layers=layers), expected, FP32_RTOL,
                     f"jax {method} vs numpy")


def test_grn_matches_the_deep_cross_attention_package():
    """torch_ref's GRN-v3 (peers.grn) equals `deep_cross_attention.GRN` (lucidrains, PyPI) with
    three outputs on the same weights. Its RMSNorm has a learned scale gamma before the linear
    w: relu(w . (gamma * x^)) = relu((gamma * w) . x^), so our w is gamma * w; its epsilon is
    float32's machine epsilon. Not compared: its k-DCA (DCAGPT.select_layers keeps the first and
    last k outputs and DROPS the ones between; ours sums them, docs/maths.md C7) and its block
    (GELU MLP with biases, a norm per projection, a final GRN: a different model around the GRN)."""
    dca_package = pytest.importorskip("deep_cross_attention")  # a test dependency (pyproject [test])
    h, depth, b, s = 32, 4, 2, 5
    torch.manual_seed(0)
    package = dca_package.GRN(h, num_layers=depth, num_outputs=3)
    with torch.no_grad():
        for parameter in package.parameters():
            parameter.copy_(parameter + 0.3 * torch.randn_like(parameter))
    outputs = torch.randn(depth, b, s, h)
    expected = package(outputs)  # [3, b, s, h]

    gamma, linear = package.to_aggregate[0].weight, package.to_aggregate[1].weight  # [h], [3, h]
    layer = types.SimpleNamespace(dca_w=linear * gamma, dca_bias=package.bias)
    config = types.SimpleNamespace(rms_norm_eps=torch.finfo(torch.float32).eps, dca_k=None)
    ours = torch.stack([peers.grn(layer, c, list(outputs), depth - 1, config) for c in range(3)])
    assert_close(ours.detach().numpy(), expected.detach().numpy(), FP32_RTOL, "torch_ref grn vs deep_cross_attention")


def test_knobs_are_checked_and_the_learned_matrices_start_at_the_standard_residual():
    """Bad knobs name the value and what was expected; at init static MUDD's plotted depth matrix
    is the standard residual's (one-hot on the newest output X_{l+1}; the input-dependent ones at
    init: test_depth_weights.py); the FLOP counter's terms order as the schemes' work does."""
    from jax_residual.config import ModelConfig
    from jax_residual.connections import get_method
    from jax_residual.train.flops import flops_per_token

    with pytest.raises(ValueError, match=r"mudd_streams must be a non-empty subset of 'qkvr' in that order.*'rq'"):
        ModelConfig(residual_method="mudd", knobs={"mudd_streams": "rq"})
    with pytest.raises(ValueError, match="dca_k must be None or >= 1, got 0"):
        ModelConfig(residual_method="dca", knobs={"dca_k": 0})

    L = 5
    config = lambda method, **knobs: ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                 num_hidden_layers=L, num_attention_heads=4, num_key_value_heads=2,
                                                 residual_method=method, knobs=knobs)
    cfg, scheme = config("mudd", mudd_static=True), get_method("mudd")
    init = {name: weight.init(cfg) for name, weight in scheme.weights_for(cfg).items()}
    np.testing.assert_array_equal(scheme.learned_matrix(init, cfg), np.eye(L, L + 1, k=1))
    flops = lambda method, **knobs: flops_per_token(config(method, **knobs), 16)
    assert flops("standard") < flops("mudd", mudd_static=True) < flops("mudd")
    assert flops("standard") < flops("mudd", mudd_streams="r") < flops("mudd")
    assert flops("standard") < flops("dca", dca_k=1) < flops("dca")
