"""Attention Residuals (Kimi Team 2026, arXiv 2603.15031, Sec. 3; docs/maths.md C6): the input of
every sub-layer is a softmax attention over depth instead of the residual sum,

    h_k = Σ_i softmax_i(w_kᵀ RMSNorm(v_i)) v_i,

one learned pseudo-query w_k per sub-layer (attention and MLP are separate sub-layers, k = 2l + j),
and the values v_i are:
    Full AttnRes (Sec. 3.1): v_0 = the embeddings and every earlier sub-layer output;
    Block AttnRes (Sec. 3.2, `attn_res_blocks` = N): b_0 = the embeddings and b_n = the sum of
        the outputs of block n (L / N layers), the blocks completed so far plus, after the
        first sub-layer of a block, its partial sum.
Full AttnRes is Block AttnRes with blocks of one sub-layer, so one code path serves both. The
last layer's output is one more aggregation, over every block, with its own pseudo-query (a
choice: docs/maths.md C6). RMSNorm here has no learnable scale (w_k absorbs one). Pseudo-queries start at
0 (Sec. 3.1): every source then weighs the same, so at init the input of sub-layer k is the MEAN
of its sources, NOT the standard residual's sum.

Layer l owns the pseudo-queries of the two inputs that follow its sub-layers:
`attn_res_queries [2, h]` = (the input of its MLP, the input after its MLP: layer l+1's
attention, or the model's output for the last layer). Layer 0's attention reads the embeddings
alone (one source: weight 1, whatever its query), so no query is spent on it.

The stream between sub-layers is [2, b, s, h]: (the next sub-layer's input, the partial sum of
the current block). Carry: the completed blocks [M+1, b, s, h] (M = 2L for Full, N for Block),
each written once, when its block completes; Full keeps only the final carry in the backward
pass (`final_only`: the scan would save it at every layer, O(L^2 b s h)).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jax_residual import functional as F
from jax_residual import sharding
from jax_residual.connections.base import (SUBLAYERS, Connection, LayerContext, State, StateField, Weight, at_least,
                                           observe, register)


@dataclasses.dataclass(frozen=True)
class AttnResKnobs:
    attn_res_blocks: int | None = dataclasses.field(
        default=None, metadata={"help": "attn_res: Block AttnRes over N blocks of L/N layers (default None: Full AttnRes "
                                        "over every sub-layer output)"})

    __post_init__ = at_least(1, "attn_res_blocks")


def block_size(cfg) -> int:
    """Sub-layers per block: 1 (Full AttnRes) or 2L / N."""
    blocks = cfg.knobs.attn_res_blocks
    return 1 if blocks is None else len(SUBLAYERS) * cfg.num_hidden_layers // blocks


def block_count(cfg) -> int:
    """M: the blocks besides the embeddings (b_0)."""
    return len(SUBLAYERS) * cfg.num_hidden_layers // block_size(cfg)


def sources_read(k: int, cfg) -> int:
    """How many values the input after sub-layer k (k = 0 .. 2L-1) attends over."""
    return k // block_size(cfg) + 2  # the blocks before k's (b_0 included), then k's block (partial or complete)


def depth_weights(query, values, readable, eps: float):
    """softmax_i(queryᵀ RMSNorm(values_i)) over the readable i, 0 elsewhere: float32 [S, b, s].
    query [h], values [S, b, s, h], readable boolean [S]."""
    keys = F.rms_normalize(values, values.shape[-1], eps)
    logits = jnp.einsum("ibsh,h->ibs", keys, query.astype(jnp.float32))
    return jax.nn.softmax(jnp.where(readable[:, None, None], logits, -jnp.inf), axis=0)


def absorb(k, out, partial, blocks, query, cfg):
    """After sub-layer k (traced) with output `out`: (the next input [b, s, h], the new partial
    sum, the blocks, the mean weight the next input gives each block b_0 .. b_M [M+1]). Its
    block's partial sum grows by `out`; a completed block is written to its slot; the next input
    attends over the completed blocks and, inside a block, the partial sum (whose weight is its
    block's in the mean)."""
    size = block_size(cfg)
    slot, done = k // size + 1, k % size == size - 1
    partial = jnp.where(k % size == 0, out, partial + out)
    blocks = blocks.at[slot].set(jnp.where(done, partial, blocks[slot]))
    readable = jnp.concatenate([jnp.arange(blocks.shape[0]) < slot + done, jnp.logical_not(done)[None]])
    values = jnp.concatenate([blocks, partial[None]])
    weights = depth_weights(query, values, readable, cfg.rms_norm_eps)
    y = jnp.einsum("ibs,ibsh->bsh", weights, values.astype(jnp.float32)).astype(values.dtype)
    mean = weights.mean(axis=(1, 2))
    return y, partial, blocks, mean[:-1].at[slot].add(mean[-1])


@dataclasses.dataclass(frozen=True, kw_only=True)
class AttentionResiduals(Connection):
    """Softmax attention over depth as every sub-layer's input (module docstring)."""

    knobs: type = AttnResKnobs

    def observes_weights(self, cfg) -> bool:
        """Softmax weights per token. Rows: the input after sub-layer k = 2l + j, k = 0 .. 2L-1
        (two per layer; the last row is the model's output; layer 0's attention input, the
        embeddings alone, has none); columns: b_0 (the embeddings) .. b_M, the current block's
        partial sum counted as its block. Each row sums to 1."""
        return True

    def check(self, cfg) -> list[str]:
        blocks, layers = cfg.knobs.attn_res_blocks, cfg.num_hidden_layers
        if blocks is not None and layers % blocks:
            return [f"attn_res_blocks={blocks} must divide num_hidden_layers={layers} (blocks of whole layers)"]
        return []

    def state_fields(self, cfg) -> dict[str, StateField]:
        return {"attn_res_blocks": StateField(lambda c, b, s: (block_count(c) + 1, b, s, c.hidden_size),
                                              ("layers", "batch", "seq", "embed"),
                                              initial=lambda x, zeros: zeros.at[0].set(x),
                                              final_only=cfg.knobs.attn_res_blocks is None)}

    def enter(self, x, cfg, mesh=None):
        """(the input of sub-layer 0: the embeddings, an empty partial sum) [2, b, s, h]."""
        return sharding.constrain(jnp.stack([x, jnp.zeros_like(x)]), ("streams", "batch", "seq", "embed"), mesh)

    def leave(self, stream):
        return stream[0]

    def _next(self, j: int, stream, state: State, ctx: LayerContext):
        """The stream after sub-layer j of this layer, whose output is stream[0]."""
        y, partial, blocks, mean = absorb(len(SUBLAYERS) * ctx.index + j, stream[0], stream[1],
                                          state["attn_res_blocks"], ctx.params["attn_res_queries"][j], ctx.cfg)
        return jnp.stack([y, partial]), observe({**state, "attn_res_blocks": blocks}, ctx, mean)

    def connect(self, sublayer: str, stream, state: State, ctx: LayerContext):
        if sublayer == "mlp":  # stream = (the attention output, the partial sum)
            stream, state = self._next(0, stream, state, ctx)
        return stream[0], lambda out: jnp.stack([out, stream[1]]), state

    def after_block(self, x, state: State, ctx: LayerContext):
        return self._next(1, x, state, ctx)

    def flops(self, cfg, seq: int) -> dict[str, float]:
        """Per token, forward + backward (x 3), 2 FLOPs per multiply-add: each source of each of
        the 2L aggregations costs h for its logit and h for its share of the weighted sum (the
        RMSNorm of the keys and the softmax are not counted, as train/flops.py ignores norms)."""
        sources = sum(sources_read(k, cfg) for k in range(len(SUBLAYERS) * cfg.num_hidden_layers))
        return {"connections": 6.0 * 2 * cfg.hidden_size * sources}


register(AttentionResiduals(name="attn_res", weights={
    "attn_res_queries": Weight(lambda cfg: np.zeros((cfg.num_hidden_layers, len(SUBLAYERS), cfg.hidden_size),
                                                    np.float32), ("sublayers", "connection_embed"))}))
