"""GroupRMSNorm (docs/maths.md A1): a thin Flax module over `functional.group_rms_norm`."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from jax_residual.functional import group_rms_norm


class GroupRMSNorm(nn.Module):
    """Y_g = X_g / sqrt(mean(X_g**2) + eps) * gamma_g over contiguous groups of `group_size`.

    x [..., h] -> y [..., h] in `dtype` (default: x's dtype), computed in float32.
    One param "weight" (gamma) [h], logical axis ("norm",), ~ Uniform(init_range).
    init_seed: an int draws gamma from jax.random.key(init_seed), ignoring Flax's rng (same
    seed, same gamma); None draws it from the 'params' rng given to `init`.
    """

    hidden_size: int
    group_size: int
    eps: float = 1e-5
    init_range: tuple[float, float] = (-1.0, 1.0)
    init_seed: int | None = 42
    param_dtype: Any = jnp.float32
    dtype: Any = None

    def __post_init__(self):
        if self.hidden_size % self.group_size:
            raise ValueError(f"group_size={self.group_size} does not divide hidden size {self.hidden_size}")
        super().__post_init__()

    def _init_weight(self, rng, shape, dtype):
        key = rng if self.init_seed is None else jax.random.key(self.init_seed)
        low, high = self.init_range
        return jax.random.uniform(key, shape, jnp.float32, low, high).astype(dtype)

    @nn.compact
    def __call__(self, x):
        if x.shape[-1] != self.hidden_size:
            raise ValueError(f"expected last dim {self.hidden_size}, got shape {x.shape}")
        gamma = self.param("weight", nn.with_logical_partitioning(self._init_weight, ("norm",)),
                           (self.hidden_size,), self.param_dtype)
        y = group_rms_norm(x.astype(jnp.float32), gamma, self.group_size, self.eps)
        return y.astype(self.dtype or x.dtype)
