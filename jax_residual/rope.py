"""NTK-aware RoPE (docs/maths.md A4): a Flax module whose dynamic ratio is explicit state.

The current ratio k is the scalar variable ("rope", "ratio"). A call with mutable=["rope"]
returns (E, new_variables); with dynamic=True the new variables carry k' after a call that
needed longer tables, so feeding them to the next call reproduces the torch module's memory.
The (C, S) tables are not stored: they are computed for exactly the positions used.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import linen as nn

from jax_residual.functional import apply_rotary_pos_emb, ntk_ratio_for_length, rope_tables


class NTKAwareRoPE(nn.Module):
    """x [b, s, nh, dim] -> x rotated at positions offset .. offset+s-1 (same shape and dtype).

    The ratio serving a call is k while offset + s <= max_seq_len * k, else the smallest even
    k' covering offset + s; it is kept (written back to "rope") only if dynamic. `offset` may
    be traced (under jit). `init` stores the constructor's ratio and never updates it.
    """

    dim: int
    max_seq_len: int
    base: float = 10000
    ratio: float = 1
    dynamic: bool = False

    def __post_init__(self):
        if self.dim % 2:
            raise ValueError(f"RoPE head dim must be even, got {self.dim}")
        super().__post_init__()

    @nn.compact
    def __call__(self, x, offset=0):
        if x.ndim != 4 or x.shape[-1] != self.dim:
            raise ValueError(f"expected x of shape [b, s, nh, {self.dim}], got shape {x.shape}")
        stored = self.variable("rope", "ratio", lambda: jnp.asarray(self.ratio, jnp.float32))
        seq_len = x.shape[1]
        ratio = ntk_ratio_for_length(self.max_seq_len, stored.value, offset + seq_len)
        if self.dynamic and not self.is_initializing():
            stored.value = ratio
        cos, sin = rope_tables(self.dim, offset + jnp.arange(seq_len), self.base, ratio)
        return apply_rotary_pos_emb(x, cos, sin)
