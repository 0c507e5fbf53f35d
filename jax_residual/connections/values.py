"""Value residual, ResFormer (Zhou et al. 2024, arXiv 2410.17897, Sec. 3; docs/maths.md C2): layers
l >= 1 attend with the values

    V_l' = lambda_{l,1} V_l + lambda_{l,2} V_0,   V_0 = layer 0's values (before any mixing),

lambda learnable per layer, initialised (0.5, 0.5) as the paper's ResFormer. Layer 0 attends with
its own values (they are V_0). Carry: V_0 [b, s, nkv, hd].
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from jax_residual.connections.base import Connection, LayerContext, State, StateField, Weight, register


def _half_and_half(cfg):
    return np.full((cfg.num_hidden_layers, 2), 0.5, np.float32)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ValueResidual(Connection):
    """The values of layers l >= 1 mixed with layer 0's."""

    def state_fields(self, cfg) -> dict[str, StateField]:
        return {"first_values": StateField(lambda c, b, s: (b, s, c.num_key_value_heads, c.head_dim),
                                           ("batch", "seq", "kv_heads", "head_dim"))}

    def mix_values(self, v, state: State, ctx: LayerContext):
        first_values = jnp.where(ctx.first, v, state["first_values"])
        lam = ctx.params["value_lambdas"].astype(v.dtype)
        return jnp.where(ctx.first, v, lam[0] * v + lam[1] * first_values), {**state, "first_values": first_values}

    def flops(self, cfg, seq: int) -> dict[str, float]:
        """Layers 1..L-1 mix two value terms: 2 multiply-adds per kv element, x 3 for the backward."""
        return {"connections": 6.0 * 2 * cfg.num_key_value_heads * cfg.head_dim * (cfg.num_hidden_layers - 1)}


register(ValueResidual(name="value_residual", weights={"value_lambdas": Weight(_half_and_half, ("mix_terms",))}))
