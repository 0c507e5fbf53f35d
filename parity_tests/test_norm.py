"""GroupRMSNorm (docs/maths.md A1): torch reference vs Flax module, independent references, init, errors.

Tolerances: float32 paths compute the same formula in float32 -> rtol = atol = 1e-5 on O(1)
values. bfloat16 outputs/gradients are float32 results rounded to 8 mantissa bits; the two
frameworks may land one bf16 ulp (2**-8 relative) apart -> rtol = atol = 2e-2.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import linen as nn

import jax_residual as jr
import torch_ref as tr
from jax_residual.convert import (as_numpy, group_rms_norm_params_from_torch,
                                  group_rms_norm_params_to_torch)

DTYPES = {"float32": (torch.float32, jnp.float32), "bfloat16": (torch.bfloat16, jnp.bfloat16)}
TOL = {"float32": dict(rtol=1e-5, atol=1e-5), "bfloat16": dict(rtol=2e-2, atol=2e-2)}


def random_input(shape, seed):
    """float32 numpy [b, s, h] with a per-row offset and scale, so groups differ in RMS."""
    rng = np.random.default_rng(seed)
    return (rng.normal(size=shape) * rng.uniform(0.1, 5, size=shape[:-1] + (1,)) + 0.3).astype(np.float32)


def torch_forward_and_grads(module, x, cotangent):
    """y = module(x) and d<y, cotangent>/d(x, weight) by autograd."""
    x = x.clone().requires_grad_()
    y = module(x)
    (y.float() * torch.from_numpy(cotangent)).sum().backward()
    return y, x.grad, module.weight.grad


def jax_forward_and_grads(module, params, x, cotangent):
    """y = module.apply(params, x) and d<y, cotangent>/d(x, weight) by jax.grad."""
    def projection(params, x):
        y = module.apply({"params": params}, x)
        return jnp.sum(y.astype(jnp.float32) * cotangent), y

    (_, y), (grad_params, grad_x) = jax.jit(jax.value_and_grad(projection, argnums=(0, 1), has_aux=True))(params, x)
    return y, grad_x, grad_params["weight"]


@pytest.mark.parametrize("shape, group_size, x_dtype, param_dtype", [
    ((2, 5, 16), 4, "float32", "float32"),
    ((1, 7, 32), 32, "float32", "float32"),
    ((3, 4, 12), 1, "float32", "float32"),
    ((2, 3, 64), 16, "bfloat16", "float32"),
    ((2, 6, 24), 8, "float32", "bfloat16"),
])
def test_torch_jax_forward_and_gradients(shape, group_size, x_dtype, param_dtype):
    torch_norm = tr.GroupRMSNorm(shape[-1], group_size, init_seed=3, dtype=DTYPES[param_dtype][0])
    jax_norm = jr.GroupRMSNorm(shape[-1], group_size, param_dtype=DTYPES[param_dtype][1])
    params = group_rms_norm_params_from_torch(torch_norm.state_dict())
    x = random_input(shape, seed=0)
    cotangent = np.random.default_rng(1).normal(size=shape).astype(np.float32)

    torch_results = torch_forward_and_grads(torch_norm, torch.from_numpy(x).to(DTYPES[x_dtype][0]), cotangent)
    jax_results = jax_forward_and_grads(jax_norm, params, jnp.asarray(x, DTYPES[x_dtype][1]), cotangent)

    tol = TOL["bfloat16" if "bfloat16" in (x_dtype, param_dtype) else "float32"]
    assert jax_results[0].dtype == DTYPES[x_dtype][1] and torch_results[0].dtype == DTYPES[x_dtype][0]
    for name, t, j in zip(("y", "dL/dx", "dL/dweight"), torch_results, jax_results):
        np.testing.assert_allclose(as_numpy(j).astype(np.float32), as_numpy(t).astype(np.float32),
                                   err_msg=name, **tol)


def numpy_group_rms_norm(x, gamma, group_size, eps=1e-5):
    """float64 reference: normalise each slice x[..., g:g+group_size] on its own."""
    x = x.astype(np.float64)
    y = np.empty_like(x)
    for start in range(0, x.shape[-1], group_size):
        group = x[..., start:start + group_size]
        y[..., start:start + group_size] = group / np.sqrt(np.mean(group**2, axis=-1, keepdims=True) + eps)
    return y * gamma


@pytest.mark.parametrize("group_size", [1, 4, 8, 32])
def test_matches_float64_numpy_loop_over_groups(group_size):
    x = random_input((2, 3, 32), seed=2)
    torch_norm = tr.GroupRMSNorm(32, group_size)
    gamma = torch_norm.weight.detach().numpy()
    expected = numpy_group_rms_norm(x, gamma, group_size)
    jax_y = jr.GroupRMSNorm(32, group_size).apply({"params": {"weight": gamma}}, x)
    np.testing.assert_allclose(torch_norm(torch.from_numpy(x)).detach().numpy(), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(jax_y), expected, rtol=1e-5, atol=1e-5)


def test_full_group_equals_torch_rmsnorm():
    x = random_input((3, 5, 48), seed=4)
    torch_norm = tr.GroupRMSNorm(48, 48, eps=1e-6, init_seed=7)
    reference = torch.nn.RMSNorm(48, eps=1e-6)
    reference.load_state_dict(torch_norm.state_dict())
    expected = reference(torch.from_numpy(x)).detach().numpy()
    jax_y = jr.GroupRMSNorm(48, 48, eps=1e-6).apply(
        {"params": group_rms_norm_params_from_torch(torch_norm.state_dict())}, x)
    np.testing.assert_allclose(torch_norm(torch.from_numpy(x)).detach().numpy(), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(jax_y), expected, rtol=1e-5, atol=1e-5)


def test_params_round_trip_torch_to_flax_and_back():
    for dtype in (torch.float32, torch.bfloat16):
        state = tr.GroupRMSNorm(16, 4, dtype=dtype).state_dict()
        back = group_rms_norm_params_to_torch(group_rms_norm_params_from_torch(state))
        assert back["weight"].dtype == dtype and torch.equal(back["weight"], state["weight"])


HIDDEN, LOW, HIGH = 8192, -0.5, 2.0


def torch_gamma(seed):
    return tr.GroupRMSNorm(HIDDEN, 64, init_range=(LOW, HIGH), init_seed=seed).weight.detach().numpy()


def jax_gamma(seed, rng_seed=0):
    norm = jr.GroupRMSNorm(HIDDEN, 64, init_range=(LOW, HIGH), init_seed=seed)
    return np.asarray(nn.unbox(norm.init(jax.random.key(rng_seed), jnp.zeros((1, 1, HIDDEN))))["params"]["weight"])


@pytest.mark.parametrize("draw", [torch_gamma, jax_gamma])
def test_init_is_seeded_uniform(draw):
    gamma = draw(1)
    np.testing.assert_array_equal(draw(1), gamma)
    assert not np.allclose(draw(2), gamma)
    # Uniform(LOW, HIGH): inside the bounds, reaching near both ends (the gap to an end is
    # ~(HIGH-LOW)/n), mean within 5 standard errors of (LOW+HIGH)/2.
    assert LOW <= gamma.min() < LOW + 0.01 and HIGH - 0.01 < gamma.max() <= HIGH
    assert abs(gamma.mean() - (LOW + HIGH) / 2) < 5 * (HIGH - LOW) / np.sqrt(12 * HIDDEN)


def test_jax_init_seed_ignores_rng_and_none_uses_it():
    np.testing.assert_array_equal(jax_gamma(5, rng_seed=0), jax_gamma(5, rng_seed=1))
    np.testing.assert_array_equal(jax_gamma(None, rng_seed=3), jax_gamma(None, rng_seed=3))
    assert not np.allclose(jax_gamma(None, rng_seed=0), jax_gamma(None, rng_seed=1))


@pytest.mark.parametrize("make", [tr.GroupRMSNorm, jr.GroupRMSNorm])
def test_group_size_must_divide_hidden(make):
    with pytest.raises(ValueError, match="group_size=4 does not divide hidden size 10"):
        make(10, 4)


def test_wrong_hidden_size_is_rejected():
    x = np.zeros((1, 2, 12), np.float32)
    with pytest.raises(ValueError, match="expected last dim 16"):
        tr.GroupRMSNorm(16, 4)(torch.from_numpy(x))
    with pytest.raises(ValueError, match="expected last dim 16"):
        jr.GroupRMSNorm(16, 4).init(jax.random.key(0), x)
