"""Pure functions: the mathematics of docs/maths.md, with no parameters and no Flax.

Shape letters used in every docstring of this package:
  b batch, s sequence, h hidden, v vocabulary, e embedding, nh query heads, nkv key/value heads,
  hd head dim, L layers, i intermediate (MLP) size.
Norms and RoPE compute in float32 and return the input's dtype. The attention kernels are in
kernels/attention.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# ----------------------------------------------------------------------------- norms


def rms_normalize(x, group_size: int, eps: float):
    """X_g / sqrt(mean(X_g**2) + eps) for contiguous groups of `group_size` along the last axis.

    x: [..., h] with h % group_size == 0. Returns float32 [..., h] (no scale applied), so a
    caller can share one normalisation between several scales (see residual recomputation).
    """
    hidden = x.shape[-1]
    if hidden % group_size:
        raise ValueError(f"group_size={group_size} does not divide hidden size {hidden}")
    grouped = x.astype(jnp.float32).reshape(*x.shape[:-1], hidden // group_size, group_size)
    normalized = grouped * jax.lax.rsqrt(jnp.mean(grouped**2, axis=-1, keepdims=True) + eps)
    return normalized.reshape(x.shape)


def group_rms_norm(x, gamma, group_size: int, eps: float):
    """GroupRMSNorm (docs/maths.md A1): Y_g = X_g / sqrt(mean(X_g**2) + eps) * gamma_g.

    x: [..., h], gamma: [h]. Computes in float32, returns x.dtype.
    """
    return (rms_normalize(x, group_size, eps) * gamma.astype(jnp.float32)).astype(x.dtype)


# ----------------------------------------------------------------------------- embedding


def masked_lookup(table, ids):
    """Rows of table [n, e] for ids in [0, n); an all-zero row for every other id.

    ids: int [...]. Returns [..., e] in table.dtype. This is one rank's lookup-and-zero of a
    vocabulary-parallel embedding (docs/maths.md A3) and, over the whole table, a lookup that never
    clamps: JAX's default gather would silently clamp an out-of-range id to the last row.
    """
    in_range = (ids >= 0) & (ids < table.shape[0])
    rows = jnp.take(table, jnp.where(in_range, ids, 0), axis=0)
    return jnp.where(in_range[..., None], rows, jnp.zeros((), table.dtype))


def check_token_ids(ids, vocab_size: int):
    """Raise ValueError if concrete ids leave [0, vocab_size). Traced ids (inside jit) pass:
    there `masked_lookup` turns an out-of-range id into a zero embedding instead."""
    if isinstance(ids, jax.core.Tracer):
        return
    ids = np.asarray(ids)  # host-side: jnp.min would be staged (and fail) inside a jit trace
    lowest, highest = int(ids.min()), int(ids.max())
    if lowest < 0 or highest >= vocab_size:
        bad = lowest if lowest < 0 else highest
        raise ValueError(f"token id {bad} is out of range: expected 0 <= id < vocab_size={vocab_size}")


# ----------------------------------------------------------------------------- RoPE


def ntk_scaled_base(base: float, ratio, dim: int):
    """NTK-aware base (docs/maths.md A4): beta~ = k**(2/(d-2)) * beta  <=>  base * k**(d/(d-2))."""
    return base * ratio ** (dim / (dim - 2))


def ntk_ratio_for_length(max_seq_len: int, ratio, needed_len):
    """The ratio serving positions [0, needed_len): `ratio` itself while needed_len <= ms*ratio,
    else the smallest EVEN k' with ms*k' >= needed_len (docs/maths.md A4). Works on traced values."""
    even_ratio = 2 * jnp.ceil(needed_len / (2 * max_seq_len))
    return jnp.where(needed_len > max_seq_len * ratio, even_ratio, ratio)


def rope_tables(dim: int, positions, base: float, ratio=1.0):
    """(C, S) of Llama's rotate-half layout for the given positions.

    theta_i = beta~**(-i), beta~ = ntk_scaled_base(base, ratio, dim)**(2/dim), i < dim/2.
    positions: [s] (int or float). Returns two float32 arrays [s, dim].
    """
    if dim % 2:
        raise ValueError(f"RoPE head dim must be even, got {dim}")
    beta = ntk_scaled_base(base, jnp.asarray(ratio, jnp.float32), dim) ** (2.0 / dim)
    theta = beta ** -jnp.arange(dim // 2, dtype=jnp.float32)
    angles = jnp.asarray(positions, jnp.float32)[:, None] * theta[None, :]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def rotate_half(x):
    """cat(-x[..., d/2:], x[..., :d/2])."""
    first, second = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-second, first], axis=-1)


def apply_rotary_pos_emb(x, cos, sin):
    """X * C + rotate_half(X) * S for x [b, s, nh, hd] and cos, sin [s, hd].

    Computes in float32, returns x.dtype.
    """
    if x.ndim != 4:
        raise ValueError(f"expected x of shape [b, s, nh, hd], got shape {x.shape}")
    x32 = x.astype(jnp.float32)
    cos, sin = cos[:, None, :], sin[:, None, :]
    return (x32 * cos + rotate_half(x32) * sin).astype(x.dtype)


# ----------------------------------------------------------------------------- products


def einsum_f32(spec: str, a, b):
    """jnp.einsum(spec, a, b) accumulated and returned in float32, for float operands of any dtype.

    On GPU/TPU bf16 operands stay bf16 (tensor-core products, float32 accumulation). XLA:CPU
    has no BF16 x BF16 -> F32 dot ("Unsupported element type for DotThunk::Execute"), so on
    CPU they are upcast first; the result is the same, a product of two bf16 numbers being
    exact in float32. float32 operands take the plain float32 einsum on every platform.
    """
    native = lambda a, b: jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)
    if a.dtype == b.dtype == jnp.float32:
        return native(a, b)
    upcast = lambda a, b: jnp.einsum(spec, a.astype(jnp.float32), b.astype(jnp.float32))
    return jax.lax.platform_dependent(a, b, cpu=upcast, default=native)


# ----------------------------------------------------------------------------- MLP


def swiglu(x, w_gate, w_up, w_down, constrain_hidden=lambda hidden: hidden):
    """down(silu(gate(x)) * up(x)) for x [..., h], w_gate/w_up [h, i], w_down [i, h].

    The leading axes are flattened first (2-D matmuls on the tokens [t, h]: on XLA:CPU their
    backward avoids transposing copies, see benchmarks/README.md). `constrain_hidden` is applied
    to the hidden activation [t, i] (the model's sharding constraint; identity by default).
    """
    tokens = x.reshape(-1, x.shape[-1])
    hidden = constrain_hidden(jax.nn.silu(tokens @ w_gate) * (tokens @ w_up))
    return (hidden @ w_down).reshape(x.shape)
