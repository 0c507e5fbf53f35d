"""The twelve residual methods: JAX == torch_ref (logits, loss, gradients), both == a float64
numpy rendering of docs/maths.md B, init equivalences, a hand-checkable 2-layer case, bad input.

Tolerances: fp32 on both sides with jax_default_matmul_precision="highest" (conftest), so
JAX vs torch agree to ~1e-5 normwise relative error (FP32_RTOL) for logits, loss and every
parameter gradient; float32 vs float64 numpy likewise.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from llama_testlib import (BATCH, FP32_RTOL, GRAD_RTOL, METHOD_PARAM, METHODS, SEQ_LENS,
                           assert_close, assert_trees_close, jax_config, jax_fns, jax_logits, normwise_error,
                           numpy_logits, numpy_state_dict, random_ids, random_model, randomize_method_params,
                           require_jax_model, tiny_config, to_jax_params, torch_forward_backward)
from torch_ref.modeling.llama import ResidualLlamaForCausalLM

LEARNED_VS_FIXED = [("method3.2", "method3.1"), ("method4.2", "method4.1"),
                    ("method5.4", "method5.2"), ("method5.5", "method5.2")]
DIFFERENT = 1e-3  # "differs": normwise relative difference of logits above this


# ----------------------------------------------------------------------------- 1. JAX == torch_ref


@pytest.mark.parametrize("seq, attention_state", [(SEQ_LENS[0], "qk"), (SEQ_LENS[0], "probs"),
                                                  pytest.param(SEQ_LENS[-1], "qk", marks=pytest.mark.optimized)])
@pytest.mark.parametrize("method", METHODS)
def test_jax_matches_torch_logits_loss_grads(method, seq, attention_state):
    """Both attention states (stored Q/K, torch_ref's stored probabilities) give torch_ref's
    logits, loss and gradients (the default "auto" takes "probs" for 5.1-5.4 at these sizes)."""
    convert = require_jax_model()
    config = tiny_config()
    model = random_model(config, method, seed=1)  # learnable method params moved off their init
    ids = random_ids(config, seq, seed=seq)
    loss_t, logits_t, grads_t = torch_forward_backward(model, ids)

    cfg, _, value_and_grad, _ = jax_fns(method, attention_state=attention_state)
    (loss_j, logits_j), grads_j = value_and_grad(to_jax_params(model.state_dict(), cfg), ids.numpy())

    assert_close(logits_j, logits_t, FP32_RTOL, f"jax-vs-torch logits {method}")
    assert_close(loss_j, loss_t, FP32_RTOL, f"jax-vs-torch loss {method}")
    from flax import linen as nn

    expected = nn.meta.unbox(convert.params_from_state_dict(grads_t, cfg))
    assert_trees_close(nn.meta.unbox(grads_j), expected, GRAD_RTOL, f"jax-vs-torch grads {method}")
    # the gradient reaches the learnable method parameters that matter: 5.4/5.5 from layer 1 on;
    # 3.2/4.2 from layer 2 on (at layer 1 the softmax is over one logit: w = 1, gradient 0)
    if method in METHOD_PARAM:
        first = 2 if METHOD_PARAM[method] == "residual_weight_logits" else 1
        for l in range(first, config.num_hidden_layers):
            assert np.abs(grads_t[f"model.layers.{l}.{METHOD_PARAM[method]}"]).max() > 0


# ----------------------------------------------------------------------------- numpy float64 reference


@pytest.mark.parametrize("method", METHODS)
def test_torch_and_jax_match_numpy_reference(method):
    config = tiny_config()
    model = random_model(config, method, seed=2)
    ids = random_ids(config, SEQ_LENS[-1], seed=3)
    expected = numpy_logits(model.state_dict(), config, method, ids.numpy())
    with torch.no_grad():
        assert_close(model(ids).numpy(), expected, FP32_RTOL, f"torch-vs-numpy logits {method}")
    require_jax_model()
    assert_close(jax_logits(method, model.state_dict(), ids), expected, FP32_RTOL, f"jax-vs-numpy logits {method}")


def test_methods_are_distinct():
    """Guards the other tests: every method computes a different function on the same weights."""
    config = tiny_config()
    ids = random_ids(config, SEQ_LENS[-1], seed=4)
    outputs = {}
    for method in METHODS:
        with torch.no_grad():
            outputs[method] = random_model(config, method, seed=5)(ids).numpy()
    for i, first in enumerate(METHODS):
        for second in METHODS[i + 1:]:
            assert normwise_error(outputs[first], outputs[second]) > DIFFERENT, (first, second)


# ----------------------------------------------------------------------------- 3. init equivalences


@pytest.mark.parametrize("learned, fixed", LEARNED_VS_FIXED)
def test_learned_method_starts_equal_to_fixed_torch(learned, fixed):
    config = tiny_config()
    ids = random_ids(config, SEQ_LENS[-1], seed=6)
    reference = random_model(config, fixed, seed=7)
    model = ResidualLlamaForCausalLM(config, learned)  # method params at their init
    result = model.load_state_dict(reference.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert sorted(result.missing_keys) == [f"model.layers.{l}.{METHOD_PARAM[learned]}" for l in range(4)]
    with torch.no_grad():
        expected = reference(ids).numpy()
        assert_close(model(ids).numpy(), expected, 1e-6, f"torch init {learned}=={fixed}")
        randomize_method_params(model, seed=8)
        assert normwise_error(model(ids).numpy(), expected) > DIFFERENT


@pytest.mark.parametrize("learned, fixed", LEARNED_VS_FIXED)
def test_learned_method_starts_equal_to_fixed_jax(learned, fixed):
    """JAX's own init of the method params (model.init) == torch_ref's, and gives `fixed`."""
    convert = require_jax_model()
    import jax
    from flax import linen as nn

    config = tiny_config()
    ids = random_ids(config, SEQ_LENS[-1], seed=6)
    reference = random_model(config, fixed, seed=7)
    cfg, model, _, _ = jax_fns(learned)
    init = jax.jit(model.init)
    init_params = nn.meta.unbox(init(jax.random.PRNGKey(0), ids.numpy())["params"])
    init_sd = convert.state_dict_from_params(init_params, cfg)
    torch_init_sd = ResidualLlamaForCausalLM(config, learned).state_dict()
    method_keys = [f"model.layers.{l}.{METHOD_PARAM[learned]}" for l in range(4)]
    for key in method_keys:
        np.testing.assert_allclose(init_sd[key], torch_init_sd[key].numpy(), rtol=1e-7, err_msg=key)

    state_dict = {**numpy_state_dict(reference), **{k: init_sd[k] for k in method_keys}}
    expected = jax_logits(fixed, reference.state_dict(), ids)
    # two different compiled programs (the softmax/learned-exponent path vs constants): float32
    # rounding differs at ~1e-6, so FP32_RTOL here; moved parameters differ by > DIFFERENT.
    assert_close(jax_logits(learned, state_dict, ids), expected, FP32_RTOL, f"jax init {learned}=={fixed}")
    # a checkpoint without the method's keys (here: the fixed method's) loads them at their init
    assert_close(jax_logits(learned, reference.state_dict(), ids), expected, FP32_RTOL,
                 f"jax init {learned}=={fixed}")
    moved = random_model(config, learned, seed=7)  # same base weights, method params moved
    assert normwise_error(jax_logits(learned, moved.state_dict(), ids), expected) > DIFFERENT


# ----------------------------------------------------------------------------- 5. hand-checkable


def test_two_layer_method1_by_hand():
    """method1 with 2 layers, from the equations of docs/maths.md in numpy (float64), step by step:

    layer 0 (standard):  X1 = H0 + MLP0(N2_0(H0)),  H0 = X0 + Attn0(N1_0(X0)),  P0 kept
    layer 1 (method1):   H1 = X1 + Attn1(N1_1(X1));  X2 = MLP1(N2_1(H1)) + M~_0(X1)
                         M~_0(X1) = MLP0(N2_0(X1 + A~_0(X1))),  A~_0(X1) = o_0(P0 . v_0(N1_0(X1)))
    logits = N(X2) W_head^T
    """
    config = tiny_config(layers=2)
    model = random_model(config, "method1", seed=9)
    ids = random_ids(config, SEQ_LENS[0], seed=10)
    sd = {k: v.double().numpy() for k, v in model.state_dict().items()}
    hd, s = 8, SEQ_LENS[0]

    def rms(x, gamma):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + config.rms_norm_eps) * gamma

    def lin(x, key):
        return x @ sd[key].T

    def rope(x):  # x [b, s, n, 8]: rotate-half with theta_i = 500 ** (-2i / 8)
        freq = 500.0 ** (-np.arange(4) * 2 / 8)
        ang = np.arange(s)[:, None] * freq
        cos, sin = np.cos(np.hstack([ang, ang]))[:, None], np.sin(np.hstack([ang, ang]))[:, None]
        return x * cos + np.concatenate([-x[..., 4:], x[..., :4]], -1) * sin

    def layer_weights(l):
        return lambda name: f"model.layers.{l}.{name}"

    def probs(l, y):  # P_l [b, 4, s, s]; query heads 0,1 use kv head 0; heads 2,3 kv head 1
        k_ = layer_weights(l)
        q = rope(lin(y, k_("self_attn.q_proj.weight")).reshape(BATCH, s, 4, hd))
        k = rope(lin(y, k_("self_attn.k_proj.weight")).reshape(BATCH, s, 2, hd))
        k = k[:, :, [0, 0, 1, 1]]
        scores = np.einsum("bqnd,bknd->bnqk", q, k) / math.sqrt(hd)
        scores[..., ~np.tril(np.ones((s, s), bool))] = -np.inf
        e = np.exp(scores - scores.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    def attn_with(l, p, y):  # o_proj(heads(P . V(y)))
        k_ = layer_weights(l)
        v = lin(y, k_("self_attn.v_proj.weight")).reshape(BATCH, s, 2, hd)[:, :, [0, 0, 1, 1]]
        return lin(np.einsum("bnqk,bknd->bqnd", p, v).reshape(BATCH, s, 32), k_("self_attn.o_proj.weight"))

    def mlp(l, y):
        k_ = layer_weights(l)
        gate, up = lin(y, k_("mlp.gate_proj.weight")), lin(y, k_("mlp.up_proj.weight"))
        return lin(gate / (1 + np.exp(-gate)) * up, k_("mlp.down_proj.weight"))

    def n1(l, x):
        return rms(x, sd[f"model.layers.{l}.input_layernorm.weight"])

    def n2(l, x):
        return rms(x, sd[f"model.layers.{l}.post_attention_layernorm.weight"])

    x0 = sd["model.embed_tokens.weight"][ids.numpy()]
    p0 = probs(0, n1(0, x0))
    h0 = x0 + attn_with(0, p0, n1(0, x0))
    x1 = h0 + mlp(0, n2(0, h0))
    h1 = x1 + attn_with(1, probs(1, n1(1, x1)), n1(1, x1))
    m_tilde_0 = mlp(0, n2(0, x1 + attn_with(0, p0, n1(0, x1))))
    x2 = mlp(1, n2(1, h1)) + m_tilde_0
    logits = lin(rms(x2, sd["model.norm.weight"]), "lm_head.weight")

    captured = {}
    model.model.layers[1].register_forward_hook(lambda mod, args, out: captured.update(x2=out[0]))
    with torch.no_grad():
        torch_logits = model(ids).numpy()
    assert_close(captured["x2"].numpy(), x2, FP32_RTOL, "hand-check method1 layer-1 output (torch)")
    assert_close(torch_logits, logits, FP32_RTOL, "hand-check method1 logits (torch)")
    require_jax_model()
    assert_close(jax_logits("method1", model.state_dict(), ids, layers=2), logits, FP32_RTOL,
                 "hand-check method1 logits (jax)")


# ----------------------------------------------------------------------------- parameters and checkpoints


@pytest.mark.parametrize("method", METHODS)
def test_state_dict_keys_and_round_trip(method):
    """HF keys + exactly the method's own parameter; JAX state_dict_from_params inverts
    params_from_state_dict."""
    config = tiny_config()
    model = random_model(config, method, seed=11)
    sd = numpy_state_dict(model)
    layer_keys = {"self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                  "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
                  "input_layernorm.weight", "post_attention_layernorm.weight"}
    shapes = {"residual_weight_logits": (4,), "score_exponents": (2,), "score_weights": (4,)}
    if method in METHOD_PARAM:
        layer_keys.add(METHOD_PARAM[method])
    expected = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    expected |= {f"model.layers.{l}.{k}" for l in range(4) for k in layer_keys}
    assert set(sd) == expected
    if method in METHOD_PARAM:
        assert sd[f"model.layers.0.{METHOD_PARAM[method]}"].shape == shapes[METHOD_PARAM[method]]

    convert = require_jax_model()
    cfg = jax_fns(method)[0]
    back = convert.state_dict_from_params(to_jax_params(sd, cfg), cfg)
    assert set(back) == set(sd)
    for key, value in sd.items():
        np.testing.assert_array_equal(np.asarray(back[key]), value, err_msg=key)


def test_torch_initial_method_params():
    config = tiny_config()
    sd = {m: ResidualLlamaForCausalLM(config, m).state_dict() for m in ("method3.2", "method5.4", "method5.5")}
    for l in range(4):
        assert torch.equal(sd["method3.2"][f"model.layers.{l}.residual_weight_logits"], torch.zeros(4))
        assert torch.equal(sd["method5.4"][f"model.layers.{l}.score_exponents"], torch.tensor([0.5, 0.5]))
        assert torch.allclose(sd["method5.5"][f"model.layers.{l}.score_weights"], torch.full((4,), (l + 1) ** -0.5))
        for m in sd.values():  # norms start at ones
            assert torch.equal(m[f"model.layers.{l}.input_layernorm.weight"], torch.ones(32))


# ----------------------------------------------------------------------------- 6. bad input


def test_unknown_method_lists_valid_names():
    with pytest.raises(ValueError) as error:
        ResidualLlamaForCausalLM(tiny_config(), "method6")
    for name in METHODS:
        assert name in str(error.value)
    require_jax_model()
    with pytest.raises(ValueError) as error:
        jax_config(tiny_config(), "method6")
    for name in METHODS:
        assert name in str(error.value)


@pytest.mark.parametrize("bad_id", [-1, 64])
def test_out_of_range_ids(bad_id):
    config = tiny_config()
    model = random_model(config, "method1", seed=12)
    ids = random_ids(config, 6, seed=13)
    ids[1, 3] = bad_id
    with pytest.raises(ValueError, match=f"token id {bad_id}.*vocab_size=64"):
        model(ids)
    require_jax_model()
    cfg, jax_model, _, _ = jax_fns("method1")
    with pytest.raises(ValueError, match=str(bad_id)):
        jax_model.apply({"params": to_jax_params(model.state_dict(), cfg)}, ids.numpy())


def test_sequence_longer_than_max_positions():
    config = tiny_config()
    model = random_model(config, "method2", seed=14)
    too_long = random_ids(config, 17, seed=15)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(too_long)
    require_jax_model()
    cfg, jax_model, _, _ = jax_fns("method2")
    with pytest.raises(ValueError, match="max_position_embeddings"):
        jax_model.apply({"params": to_jax_params(model.state_dict(), cfg)}, too_long.numpy())


@pytest.mark.parametrize("key, shape", [("model.layers.2.self_attn.k_proj.weight", (32, 32)),
                                        ("model.embed_tokens.weight", (65, 32)),
                                        ("model.layers.1.score_weights", (5,))])
def test_checkpoint_shape_mismatch_is_a_clear_error(key, shape):
    """params_from_state_dict names the offending key (a [nh*hd, h] k_proj in a GQA config, a
    wrong vocabulary, a method parameter of the wrong length)."""
    convert = require_jax_model()
    config = tiny_config()
    sd = numpy_state_dict(random_model(config, "method5.5", seed=16))
    sd[key] = np.zeros(shape, np.float32)
    cfg = jax_fns("method5.5")[0]
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        convert.params_from_state_dict(sd, cfg)


def test_checkpoint_missing_key_is_a_clear_error():
    convert = require_jax_model()
    sd = numpy_state_dict(random_model(tiny_config(), "method3.2", seed=17))
    del sd["model.layers.3.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match=r"model\.layers\.3\.mlp\.up_proj\.weight"):
        convert.params_from_state_dict(sd, jax_fns("method3.2")[0])


def test_checkpoint_unexpected_key_is_a_clear_error():
    """A method-5.4 checkpoint loaded as method 5.5 (score_exponents where score_weights belong)."""
    convert = require_jax_model()
    sd = numpy_state_dict(random_model(tiny_config(), "method5.4", seed=18))
    with pytest.raises(ValueError, match="score_exponents"):
        convert.params_from_state_dict(sd, jax_fns("method5.5")[0])
