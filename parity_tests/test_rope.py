"""NTK-aware RoPE (docs/maths.md A4): torch reference vs Flax module, independent references, the
dynamic-ratio rule, buffers, errors.

Tolerances: both sides compute float32 angles n * theta_i; theta may differ by an ulp between
torch's and XLA's pow, so the angle differs by up to ~n * 6e-8 (n <= ~130 here; seen: 1.5e-6)
-> float32 rtol = atol = 1e-5. bfloat16 outputs are rounded to 8 mantissa bits -> 2e-2.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jax_residual as jr
import torch_ref as tr
from jax_residual.convert import as_numpy

DTYPES = {"float32": (torch.float32, jnp.float32), "bfloat16": (torch.bfloat16, jnp.bfloat16)}
TOL = {"float32": dict(rtol=1e-5, atol=1e-5), "bfloat16": dict(rtol=2e-2, atol=2e-2)}


def random_x(shape, seed):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def torch_rope_and_grad(rope, x, offset, cotangent):
    x = x.clone().requires_grad_()
    out = rope(x, offset=offset)
    (out.float() * torch.from_numpy(cotangent)).sum().backward()
    return out, x.grad


def jax_rope_and_grad(rope, variables, x, offset, cotangent):
    def projection(x):
        out, _ = rope.apply(variables, x, offset=offset, mutable=["rope"])
        return jnp.sum(out.astype(jnp.float32) * cotangent), out

    (_, out), grad = jax.jit(jax.value_and_grad(projection, has_aux=True))(x)
    return out, grad


@pytest.mark.parametrize("shape, max_seq_len, ratio, offset, dtype", [
    ((2, 5, 3, 8), 16, 1, 0, "float32"),
    ((1, 7, 2, 16), 8, 2, 3, "float32"),  # offset + s = 10 <= 16: tables of k = 2
    ((2, 6, 4, 32), 4, 1, 9, "float32"),  # 15 > 4: this call uses k' = 4
    ((1, 4, 2, 64), 32, 3, 100, "bfloat16"),  # 104 > 96: k' = 4
])
def test_torch_jax_forward_and_gradient(shape, max_seq_len, ratio, offset, dtype):
    dim = shape[-1]
    torch_rope = tr.NTKAwareRoPE(dim, max_seq_len, ratio=ratio)
    jax_rope = jr.NTKAwareRoPE(dim, max_seq_len, ratio=ratio)
    x = random_x(shape, seed=0)
    cotangent = random_x(shape, seed=1)
    variables = jax.jit(jax_rope.init)(jax.random.key(0), x)

    torch_results = torch_rope_and_grad(torch_rope, torch.from_numpy(x).to(DTYPES[dtype][0]), offset, cotangent)
    jax_results = jax_rope_and_grad(jax_rope, variables, jnp.asarray(x, DTYPES[dtype][1]), offset, cotangent)

    assert jax_results[0].dtype == DTYPES[dtype][1] and torch_results[0].dtype == DTYPES[dtype][0]
    for name, t, j in zip(("out", "dL/dx"), torch_results, jax_results):
        np.testing.assert_allclose(as_numpy(j).astype(np.float32), as_numpy(t).astype(np.float32),
                                   err_msg=name, **TOL[dtype])


def reference_theta(dim, base, ratio):
    """float64 theta_i of NTK-aware RoPE written as the scaled base: base * k**(d/(d-2))."""
    return (base * ratio ** (dim / (dim - 2))) ** (-2.0 * np.arange(dim // 2) / dim)


def rope_of(framework, dim, max_seq_len, base, ratio):
    """fn(x [b, s, nh, dim], offset) -> float32 output of a fresh module (jitted for JAX)."""
    if framework == "torch":
        module = tr.NTKAwareRoPE(dim, max_seq_len, base=base, ratio=ratio)
        return lambda x, offset: module(torch.from_numpy(x), offset=offset).numpy()
    module = jr.NTKAwareRoPE(dim, max_seq_len, base=base, ratio=ratio)
    return jax.jit(lambda x, offset: module.apply(module.init(jax.random.key(0), x), x, offset=offset))


@pytest.mark.parametrize("framework", ["torch", "jax"])
@pytest.mark.parametrize("dim, base, ratio", [(8, 10000, 1), (16, 10000, 2), (64, 500000, 8), (32, 10000, 3)])
def test_frequencies_are_ntk_scaled_base(framework, dim, base, ratio):
    # Probe x = (1, ..., 1, 0, ..., 0) gives out = (cos(n theta), sin(n theta)); at n = 1 the
    # angles are theta_i <= 1 rad, so atan2 recovers the frequencies the tables imply.
    probe = np.concatenate([np.ones(dim // 2), np.zeros(dim // 2)]).astype(np.float32)[None, None, None, :]
    out = np.asarray(rope_of(framework, dim, 4, base, ratio)(probe, 1))[0, 0, 0]
    theta = np.arctan2(out[dim // 2:], out[:dim // 2])
    np.testing.assert_allclose(theta, reference_theta(dim, base, ratio), rtol=1e-5, atol=1e-9)


def numpy_rope(x, positions, theta):
    """float64 RoPE, pair by pair: (a, b) = (x_i, x_{i+d/2}) -> (a cos - b sin, b cos + a sin)."""
    x = x.astype(np.float64)
    out = np.empty_like(x)
    half = x.shape[-1] // 2
    for i in range(half):
        cos = np.cos(positions * theta[i])[None, :, None]
        sin = np.sin(positions * theta[i])[None, :, None]
        a, b = x[..., i], x[..., i + half]
        out[..., i], out[..., i + half] = a * cos - b * sin, b * cos + a * sin
    return out


@pytest.mark.parametrize("framework", ["torch", "jax"])
@pytest.mark.parametrize("max_seq_len, ratio, offset, used_ratio", [(64, 1, 0, 1), (16, 2, 7, 2), (8, 1, 30, 6)])
def test_matches_hand_computed_rotate_half(framework, max_seq_len, ratio, offset, used_ratio):
    x = random_x((2, 9, 3, 16), seed=2)
    expected = numpy_rope(x, np.arange(offset, offset + 9), reference_theta(16, 10000, used_ratio))
    np.testing.assert_allclose(np.asarray(rope_of(framework, 16, max_seq_len, 10000, ratio)(x, offset)), expected,
                               **TOL["float32"])


# (initial ratio, calls as (seq_len, offset) with max_seq_len 8,
#  ratio each call uses if dynamic, ratio each call uses if not dynamic)
CALL_SEQUENCES = [
    (1, [(4, 0), (6, 5), (3, 20), (2, 0), (8, 30)], [1, 2, 4, 4, 6], [1, 2, 4, 1, 6]),
    (3, [(5, 20), (4, 0), (9, 24)], [4, 4, 6], [4, 3, 6]),
]


@pytest.mark.parametrize("dynamic", [True, False])
@pytest.mark.parametrize("ratio, calls, used_if_dynamic, used_if_static", CALL_SEQUENCES)
def test_dynamic_ratio_rule_in_both_frameworks(dynamic, ratio, calls, used_if_dynamic, used_if_static):
    torch_rope = tr.NTKAwareRoPE(8, 8, ratio=ratio, dynamic=dynamic)
    jax_rope = jr.NTKAwareRoPE(8, 8, ratio=ratio, dynamic=dynamic)
    jax_step = jax.jit(lambda variables, x, offset: jax_rope.apply(variables, x, offset=offset, mutable=["rope"]))
    variables = jax.jit(jax_rope.init)(jax.random.key(0), np.zeros((1, 1, 1, 8), np.float32))
    used = used_if_dynamic if dynamic else used_if_static
    for call, ((seq_len, offset), used_ratio) in enumerate(zip(calls, used)):
        x = random_x((2, seq_len, 2, 8), seed=call)
        torch_out = torch_rope(torch.from_numpy(x), offset=offset).numpy()
        jax_out, variables = jax_step(variables, x, offset)  # offset traced under jit
        kept = used_ratio if dynamic else ratio
        assert torch_rope.ratio == kept and float(variables["rope"]["ratio"]) == kept
        assert torch_rope.cos.shape == torch_rope.sin.shape == (8 * kept, 8)
        # this call equals a fresh static module built with the ratio the rule picked
        fresh = tr.NTKAwareRoPE(8, 8, ratio=used_ratio)(torch.from_numpy(x), offset=offset).numpy()
        np.testing.assert_allclose(torch_out, fresh, rtol=0, atol=0)
        np.testing.assert_allclose(np.asarray(jax_out), torch_out, **TOL["float32"])


def test_jax_init_keeps_constructor_ratio():
    rope = jr.NTKAwareRoPE(8, 4, ratio=1, dynamic=True)
    variables = jax.jit(rope.init)(jax.random.key(0), np.zeros((1, 20, 1, 8), np.float32))
    assert float(variables["rope"]["ratio"]) == 1.0


def test_torch_tables_are_non_persistent_buffers():
    rope = tr.NTKAwareRoPE(8, 6, ratio=2)
    assert rope.state_dict() == {} and dict(rope.named_buffers()).keys() == {"cos", "sin"}
    assert rope.cos.shape == (12, 8)
    rope = rope.to(torch.float64)
    assert rope.cos.dtype == torch.float64
    x = torch.from_numpy(random_x((1, 3, 1, 8), seed=3))
    assert rope(x).dtype == torch.float32


@pytest.mark.parametrize("make", [tr.NTKAwareRoPE, jr.NTKAwareRoPE])
def test_odd_head_dim_is_rejected(make):
    with pytest.raises(ValueError, match="RoPE head dim must be even, got 7"):
        make(7, 16)


@pytest.mark.parametrize("shape", [(3, 2, 8), (1, 3, 2, 2, 8), (1, 3, 2, 6)])
@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_wrong_input_shape_is_rejected(framework, shape):
    with pytest.raises(ValueError, match=r"expected x of shape \[b, s, nh, 8\]"):
        rope_of(framework, 8, 16, 10000, 1)(np.zeros(shape, np.float32), 0)
