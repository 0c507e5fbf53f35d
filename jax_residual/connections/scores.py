"""Method 5 (docs/maths.md B2): the attention scores of layer l >= 1 sum those of every layer so far,

    P_l = softmax(sum_{i<=l} sigma_{l,i} S_i + mask),   S_i = Q_i K_i^T (post-RoPE, unscaled),

residuals standard. A scheme of this family is its `score_scales(l, p, L, hd) -> sigma [L]`, zero
for i > l; `uniform` when sigma_{l,i} is the same for every i <= l (5.1-5.4: then the "probs"
state keeps only the running sum of the scores). With m = l + 1 summed layers:
5.1 sigma = 1/sqrt(hd); 5.2 1/(sqrt(hd) sqrt(m)); 5.3 1/(sqrt(hd) m); 5.4 1/(hd^a m^b), a, b
learnable (init 0.5); 5.5 c_{l,i}/sqrt(hd), c learnable (init 1/sqrt(m)). RealFormer is 5.1.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax.numpy as jnp
import numpy as np

from jax_residual.connections.base import Connection, LayerContext, State, Weight, register, standard_scales
from jax_residual.connections.rerun import rerun_pair_count


def _summed(l, num_layers):
    """Boolean [L]: i <= l, and m = l + 1, the number of summed score matrices."""
    return jnp.arange(num_layers) <= l, (l + 1).astype(jnp.float32)


def uniform_scales(divisor: Callable):
    """sigma_{l,i} = 1 / divisor(m, hd, p) for every i <= l."""

    def scales(l, p, num_layers, head_dim):
        summed, m = _summed(l, num_layers)
        return jnp.where(summed, 1.0 / divisor(m, head_dim, p), 0.0)

    return scales


def learned_score_weights(l, p, num_layers, head_dim):
    """sigma_{l,i} = c_{l,i} / sqrt(hd), c learnable (method 5.5)."""
    summed, _ = _summed(l, num_layers)
    return jnp.where(summed, p["score_weights"].astype(jnp.float32) * head_dim**-0.5, 0.0)


def _half_exponents(cfg):
    """(a, b) = (0.5, 0.5): 5.4 starts equal to 5.2."""
    return np.full((cfg.num_hidden_layers, 2), 0.5, np.float32)


def _inverse_sqrt_depth(cfg):
    """c_{l,i} = 1/sqrt(l + 1), so 5.5 starts equal to 5.2."""
    L = cfg.num_hidden_layers
    return np.repeat(1.0 / np.sqrt(np.arange(1, L + 1, dtype=np.float32))[:, None], L, 1)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SummedScores(Connection):
    """Method 5: layer l >= 1 attends with the weighted sum of the stored scores (layer 0: its own)."""

    score_scales: Callable
    uniform: bool = False

    @property
    def probs_state(self):
        """The running score sum where the weights are uniform, else every layer's scores."""
        return "score_sum" if self.uniform else "scores"

    def scales(self, l, p, cfg):
        """sigma [L] of layer l (the standard layer's at l = 0)."""
        L, hd = cfg.num_hidden_layers, cfg.head_dim
        return jnp.where(l == 0, standard_scales(l, L, hd), self.score_scales(l, p, L, hd))

    def attend(self, q, k, v, state: State, ctx: LayerContext):
        return ctx.memory.attend_summed_scores(state, ctx.index, v, self.scales(ctx.index, ctx.params, ctx.cfg))

    def flops(self, cfg, seq: int) -> dict[str, float]:
        """Each (layer l, earlier layer i) pair adds one Q K^T block: 6 s q per token."""
        pairs = rerun_pair_count(cfg.num_hidden_layers)
        return {"scores": pairs * 6.0 * seq * cfg.num_attention_heads * cfg.head_dim}

    def learned_matrix(self, params: dict, cfg) -> np.ndarray:
        """[L, L]: the weight of S_i in layer l's scores relative to standard attention,
        sigma_{l,i} sqrt(hd) (1 on the diagonal of a standard layer)."""
        rows = [self.scales(jnp.asarray(l), {name: jnp.asarray(value[l]) for name, value in params.items()}, cfg)
                for l in range(cfg.num_hidden_layers)]
        return np.asarray(jnp.stack(rows) * cfg.head_dim**0.5, np.float64)


register(SummedScores(name="method5.1", uniform=True, score_scales=uniform_scales(lambda m, hd, p: hd**0.5)))
register(SummedScores(name="method5.2", uniform=True,
                      score_scales=uniform_scales(lambda m, hd, p: hd**0.5 * jnp.sqrt(m))))
register(SummedScores(name="method5.3", uniform=True, score_scales=uniform_scales(lambda m, hd, p: hd**0.5 * m)))
register(SummedScores(
    name="method5.4", uniform=True,
    score_scales=uniform_scales(lambda m, hd, p: hd ** p["score_exponents"][0] * m ** p["score_exponents"][1]),
    weights={"score_exponents": Weight(_half_exponents, ("exponents",))},
))
register(SummedScores(name="method5.5", score_scales=learned_score_weights,
                      weights={"score_weights": Weight(_inverse_sqrt_depth)}))
