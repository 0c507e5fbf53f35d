"""DenseFormer's depth-weighted average (Pagliardini et al. 2024, arXiv 2402.02622, Sec. 3 and the
k x p "dilated, periodic" variant of Sec. 3.2; docs/maths.md C1): after block l (a whole standard
layer, both residuals inside) the next input is

    X_{l+1} = sum_j alpha_{l,j} Z_j,   Z_0 = the embeddings, Z_{j+1} = Y_j the output of block j,

reading only j = l + 1 (mod k), and only after blocks with (l + 1) % p == 0 (the others pass Y_l
on, as epfml/DenseFormer's code). alpha starts at the identity (alpha_{l,l+1} = 1), so at
initialisation the model IS the standard one. Carry: the L + 1 block outputs [L+1, b, s, h]; the
average is one contraction over all L + 1 slots (unread ones weigh 0).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from jax_residual.connections.base import Connection, LayerContext, State, StateField, Weight, at_least, register


@dataclasses.dataclass(frozen=True)
class DenseKnobs:
    """DenseFormer's k x p (k = p = 1: a DWA after every block over every earlier block output)."""

    dense_dilation: int = dataclasses.field(
        default=1, metadata={"help": "denseformer: each depth-weighted average reads every K-th block output (k of k x p)"})
    dense_period: int = dataclasses.field(
        default=1, metadata={"help": "denseformer: a depth-weighted average after every P-th block only (p of k x p)"})

    __post_init__ = at_least(1, "dense_dilation", "dense_period")


def dwa_inputs(l, cfg):
    """Boolean [L+1]: the Z_j the DWA after block l reads (j <= l+1, j = l+1 mod k); after a
    block without a DWA ((l + 1) % p != 0) only Z_{l+1}."""
    j, last = jnp.arange(cfg.num_hidden_layers + 1), l + 1
    has_dwa = last % cfg.knobs.dense_period == 0
    return (j <= last) & jnp.where(has_dwa, (last - j) % cfg.knobs.dense_dilation == 0, j == last)


def depth_weighted_average(l, p, cfg):
    """alpha [L+1] of X_{l+1} = sum_j alpha_j Z_j: the learned dense_weights on the DWA's inputs,
    or one-hot at l + 1 (Y_l passed on) after a block without a DWA."""
    last = l + 1
    one_hot = (jnp.arange(cfg.num_hidden_layers + 1) == last).astype(jnp.float32)
    alpha = jnp.where(last % cfg.knobs.dense_period == 0, p["dense_weights"].astype(jnp.float32), one_hot)
    return jnp.where(dwa_inputs(l, cfg), alpha, 0.0)


def _identity_dwa(cfg):
    """alpha_{l,l+1} = 1, the rest 0: the standard model."""
    L = cfg.num_hidden_layers
    return np.eye(L, L + 1, k=1, dtype=np.float32)


def dwa_term_count(cfg) -> int:
    """How many (block l, Z_j) terms the DWAs of one forward pass sum (blocks without a DWA: 0)."""
    return sum(int(np.sum(np.asarray(dwa_inputs(l, cfg)))) for l in range(cfg.num_hidden_layers)
               if (l + 1) % cfg.knobs.dense_period == 0)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DenseFormer(Connection):
    """A depth-weighted average of the embeddings and the block outputs after each block."""

    knobs: type = DenseKnobs

    def state_fields(self, cfg) -> dict[str, StateField]:
        return {"block_outputs": StateField(lambda c, b, s: (c.num_hidden_layers + 1, b, s, c.hidden_size),
                                            ("layers", "batch", "seq", "embed"),
                                            initial=lambda x, zeros: zeros.at[0].set(x))}

    def after_block(self, x, state: State, ctx: LayerContext):
        blocks = state["block_outputs"].at[ctx.index + 1].set(x)
        alpha = depth_weighted_average(ctx.index, ctx.params, ctx.cfg).astype(x.dtype)
        return jnp.einsum("j,j...->...", alpha, blocks), {**state, "block_outputs": blocks}

    def flops(self, cfg, seq: int) -> dict[str, float]:
        """6 h FLOPs per token per DWA term (a multiply-add per element, forward + backward)."""
        return {"connections": 6.0 * cfg.hidden_size * dwa_term_count(cfg)}

    def learned_matrix(self, params: dict, cfg) -> np.ndarray:
        """[L, L+1]: alpha_{l,j} of X_{l+1} = sum_j alpha_{l,j} Z_j (Z_0 the embeddings)."""
        rows = [depth_weighted_average(jnp.asarray(l), {name: jnp.asarray(value[l]) for name, value in params.items()},
                                       cfg) for l in range(cfg.num_hidden_layers)]
        return np.asarray(jnp.stack(rows), np.float64)


register(DenseFormer(name="denseformer", weights={"dense_weights": Weight(_identity_dwa, ("blocks",))}))
