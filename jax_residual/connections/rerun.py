"""Methods 1-4 (docs/maths.md B1, B2): earlier layers re-run on the current input with their stored
attention, their outputs replacing one residual of layer l >= 1:

    sublayer "attention":  H_l = a_l + sum_{i<l} w_{l,i} A~_i(X_l)         (methods 2, 4.x)
    sublayer "mlp":        X_{l+1} = m_l + sum_{i<l} w_{l,i} M~_i(X_l)     (methods 1, 3.x)

or, with `rerun_keep_identity`, added to the identity path instead of replacing it:

    H_l = X_l + a_l + sum_{i<l} w_{l,i} A~_i(X_l),   X_{l+1} = H_l + m_l + sum_{i<l} w_{l,i} M~_i(X_l)

    A~_i(X) = heads(P_i . (N1_i(X) Wv_i)) Wo_i,   M~_i(X) = MLP_i(N2_i(X + A~_i(X)))

A scheme of this family is its sub-layer and its `earlier_weights(l, rerun, p) -> w [L]` over
the re-run layers `rerun` (boolean [L], `rerun_layers`), zero elsewhere. The earlier layers'
attention comes from the attention store (stores.py: stored Q/K, stored P_i, or the decoding
cache); the arithmetic of a re-run is here (`recompute_earlier`).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jax_residual import functional as F
from jax_residual.connections.base import Connection, LayerContext, State, Weight, at_least, register
from jax_residual.params import RERUN_PARAM_NAMES


@dataclasses.dataclass(frozen=True)
class RerunKnobs:
    """The knobs of methods 1-4 (off by default): the cost knobs, and the identity-kept ablation."""

    rerun_window: int | None = dataclasses.field(
        default=None, metadata={"help": "methods 1-4 cost knob: each layer re-runs only its last K earlier layers"})
    rerun_every: int = dataclasses.field(
        default=1, metadata={"help": "methods 1-4 cost knob: only layers 0, P, 2P, ... are re-run"})
    rerun_keep_identity: bool = dataclasses.field(
        default=False, metadata={"help": "methods 1-4: keep the identity path, adding the re-run layers' sum to "
                                         "the residual stream instead of replacing it"})

    __post_init__ = at_least(1, "rerun_window", "rerun_every")


def rerun_layers(l, num_layers: int, window: int | None = None, every: int = 1):
    """Boolean [L]: the earlier layers i < l that layer l re-runs. All of them by default;
    `window` keeps the last `window` (i >= l - window), `every` keeps i = 0, p, 2p, ..."""
    i = jnp.arange(num_layers)
    rerun = (i < l) & (i % every == 0)
    return rerun if window is None else rerun & (i >= l - window)


def rerun_pair_count(num_layers: int, window: int | None = None, every: int = 1) -> int:
    """How many (layer l, earlier layer i) re-runs one forward pass makes: sum_l |rerun_layers(l)|."""
    return int(sum(jnp.sum(rerun_layers(l, num_layers, window, every)) for l in range(num_layers)))


# ----------------------------------------------------------------------------- weights w_{l,i}


def sum_of_earlier(l, rerun, p):
    """w_{l,i} = 1: the plain sum (methods 1, 2)."""
    return rerun.astype(jnp.float32)


def mean_of_earlier(l, rerun, p):
    """w_{l,i} = 1/l (1/#re-run layers): the average (methods 3.1, 4.1)."""
    return sum_of_earlier(l, rerun, p) / jnp.maximum(jnp.sum(rerun), 1)


def softmax_of_earlier(l, rerun, p):
    """w_{l,.} = softmax(alpha_{l,.}) over the re-run layers, alpha learnable (methods 3.2, 4.2)."""
    logits = jnp.where(rerun, p["residual_weight_logits"].astype(jnp.float32), -jnp.inf)
    return jnp.where(rerun, jax.nn.softmax(logits, where=rerun), 0.0)


def _zeros_per_earlier_layer(cfg):
    """alpha = 0: 3.2 / 4.2 start equal to 3.1 / 4.1."""
    return np.zeros((cfg.num_hidden_layers, cfg.num_hidden_layers), np.float32)


ALPHA = {"residual_weight_logits": Weight(_zeros_per_earlier_layer)}


# ----------------------------------------------------------------------------- the re-run arithmetic


def rerun_values(x_hat, p, cfg):
    """V of C earlier layers re-run on the current input: N1_c(x) Wv_c for x's shared
    normalisation x_hat [b, s, h] and layer params p stacked [C, ...] -> [C, b, s, nkv, hd].

    N1_c(x) = x_hat * gamma_c, so gamma_c is folded into Wv_c: one matmul gives every value.
    """
    b, s, _ = x_hat.shape
    v = jnp.einsum("bsh,chk->cbsk", x_hat, p["input_layernorm"][:, :, None] * p["v_proj"])
    return v.reshape(-1, b, s, cfg.num_key_value_heads, cfg.head_dim)


def rerun_outputs(x, heads, p, w, output: str, cfg):
    """sum_c w_c A~_c(x) (output="attention") or sum_c w_c M~_c(x) (output="mlp") from the re-run
    attention heads [C, b, s, nh, hd] = P_c . V_c of C earlier layers (params p stacked [C, ...],
    weights w [C]); x [b, s, h].

    The attention output sum is one contraction over (layer, head dims); the MLP re-runs are C
    2-D matmul chains on the flattened tokens (batched [C, t, i] weight gradients are slow on
    XLA:CPU, see benchmarks/README.md). The weights w stay float32 and so does the weighted sum
    (returned float32 [b, s, h]).
    """
    C, b, s = heads.shape[:3]
    dtype = x.dtype
    heads = heads.reshape(C, b * s, -1)
    if output == "attention":
        weighted = (heads.astype(jnp.float32) * w[:, None, None]).astype(dtype)
        return F.einsum_f32("ctk,ckh->th", weighted, p["o_proj"]).reshape(x.shape)
    tokens = x.reshape(b * s, -1)

    def rerun_mlp(c):
        h = tokens + heads[c] @ p["o_proj"][c]
        h_hat = F.rms_normalize(h, cfg.hidden_size, cfg.rms_norm_eps).astype(dtype)
        gamma = p["post_attention_layernorm"][c][:, None]
        return F.swiglu(h_hat, gamma * p["gate_proj"][c], gamma * p["up_proj"][c], p["down_proj"][c])

    return sum(w[c] * rerun_mlp(c) for c in range(C)).reshape(x.shape)


def recompute_chunk(x, x_hat, attention: tuple, p, w, heads_of: Callable, output: str, cfg):
    """sum_c w_c A~_c(x) or sum_c w_c M~_c(x) (`rerun_outputs`) over a chunk of C earlier layers:
    `heads_of(attention, v)` gives their heads P_c V_c from the chunk's stored `attention`
    (one attention call for the chunk). x [b, s, h] and its shared normalisation x_hat."""
    v = rerun_values(x_hat.astype(x.dtype), p, cfg)
    return rerun_outputs(x, heads_of(attention, v), p, w, output, cfg)


def recompute_earlier(x, stored: tuple, heads_of: Callable, layers, rerun, weights, output: str, cfg,
                      checkpoint_chunks: bool):
    """sum_i w_i A~_i(x) or w_i M~_i(x) over the re-run layers i (`rerun` [L] boolean, weights
    [L] zero elsewhere), in chunks of C = recompute_chunk_size layers. stored: the store's
    [L, ...] arrays a re-run reads, and heads_of(chunk of them, v) its heads (stores.py).

    The candidates are layers 0, p, 2p, ... (p = `rerun_every`, default 1: all), sliced
    statically; an inner scan walks them C at a time, and `lax.cond` skips a chunk that holds
    no re-run layer (at or after the current layer, or before the `rerun_window`). So layer l
    runs ceil(l/C) chunks (at most C-1 wasted layers; none at the default C = 1) and the HLO
    holds one chunk body whatever L is. The sum accumulates in float32; returns x.dtype.
    `checkpoint_chunks`: a chunk's activations are recomputed in the backward pass.
    """
    x_hat = F.rms_normalize(x, cfg.hidden_size, cfg.rms_norm_eps)
    compute = jax.checkpoint(recompute_chunk, static_argnums=(5, 6, 7)) if checkpoint_chunks else recompute_chunk
    every = cfg.knobs.rerun_every

    def chunks(a):
        candidates = a[::every]
        return candidates.reshape(-1, cfg.recompute_chunk_size, *candidates.shape[1:])

    def step(total, xs):
        rerun, attention, p, w = xs
        contribution = jax.lax.cond(
            jnp.any(rerun),
            lambda: compute(x, x_hat, attention, p, w, heads_of, output, cfg),
            lambda: jnp.zeros(x.shape, jnp.float32),
        )
        return total + contribution, None

    rerun_params = {name: layers[name] for name in RERUN_PARAM_NAMES}
    xs = jax.tree.map(chunks, (rerun, stored, rerun_params, weights))
    total, _ = jax.lax.scan(step, jnp.zeros(x.shape, jnp.float32), xs)
    return total.astype(x.dtype)


# ----------------------------------------------------------------------------- the family


@dataclasses.dataclass(frozen=True, kw_only=True)
class Rerun(Connection):
    """Methods 1-4: `sublayer` ("attention" or "mlp") takes the weighted sum of the earlier layers
    re-run on X_l (`earlier_weights`) as its residual, where layer l re-runs any."""

    sublayer: str
    earlier_weights: Callable
    knobs: type = RerunKnobs
    probs_state = "probs"  # P_i itself: a re-run is one P_i V product

    def check(self, cfg) -> list[str]:
        candidates = len(range(0, cfg.num_hidden_layers, cfg.knobs.rerun_every))
        if cfg.recompute_chunk_size < 1 or candidates % cfg.recompute_chunk_size:
            return [f"recompute_chunk_size {cfg.recompute_chunk_size} must divide the {candidates} layers that can be "
                    f"re-run (num_hidden_layers {cfg.num_hidden_layers}, rerun_every {cfg.knobs.rerun_every})"]
        return []

    def rerun_mask(self, l, cfg):
        return rerun_layers(l, cfg.num_hidden_layers, cfg.knobs.rerun_window, cfg.knobs.rerun_every)

    def pair_count(self, cfg) -> int:
        return rerun_pair_count(cfg.num_hidden_layers, cfg.knobs.rerun_window, cfg.knobs.rerun_every)

    def connect(self, sublayer: str, stream, state: State, ctx: LayerContext):
        if sublayer != self.sublayer:
            return super().connect(sublayer, stream, state, ctx)
        rerun = self.rerun_mask(ctx.index, ctx.cfg)
        weights = self.earlier_weights(ctx.index, rerun, ctx.params)
        recomputed, state = ctx.memory.rerun(ctx.layer_input, state, ctx.layers, ctx.index, rerun, weights, sublayer)
        if ctx.cfg.knobs.rerun_keep_identity:  # the re-run sum is added to the stream (0 where none is re-run)
            residual = stream + recomputed
        else:  # the re-run sum replaces the stream; a layer re-running none: standard
            residual = jnp.where(jnp.any(rerun), recomputed, stream)
        return stream, lambda out: residual + out, state

    def flops(self, cfg, seq: int) -> dict[str, float]:
        """Each re-run pair (l, i) re-runs layer i on X_l: "attention": V projection, P V, output
        projection, 6 (h kv + s q + q h); "mlp": the same plus layer i's MLP, + 6 * 3 h i."""
        h, q, kv, i = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim, \
            cfg.intermediate_size
        mlp = 3 * h * i if self.sublayer == "mlp" else 0
        return {"recompute": self.pair_count(cfg) * 6.0 * (h * kv + seq * q + q * h + mlp)}

    def qk_rerun_flops(self, cfg, seq: int) -> float:
        """What re-running from stored Q/K instead of stored P (docs/maths.md B4) adds per token:
        per pair, four Q K^T-sized matmuls (forward scores, again in the flash-style backward, dQ
        and dK), 4 * 2 * s * q."""
        return self.pair_count(cfg) * 4.0 * 2 * seq * cfg.num_attention_heads * cfg.head_dim

    def cache_fields(self, cfg, batch: int, length: int, dtype) -> State:
        """rerun_v [L, L, b, T, nkv, hd]: the values N1_i(X_l) Wv_i of earlier layer i re-run at
        layer l (pair (l, i)) for every cached position."""
        L = cfg.num_hidden_layers
        return {"rerun_v": jnp.zeros((L, L, batch, length, cfg.num_key_value_heads, cfg.head_dim), dtype)}

    def learned_matrix(self, params: dict, cfg) -> np.ndarray:
        """[L, L]: w_{l,i} of sum_{i<l} w_{l,i} A~_i / M~_i (all earlier layers; zero for i >= l)."""
        L = cfg.num_hidden_layers
        rows = [self.earlier_weights(jnp.asarray(l), rerun_layers(jnp.asarray(l), L),
                                     {name: jnp.asarray(value[l]) for name, value in params.items()})
                for l in range(L)]
        return np.asarray(jnp.stack(rows), np.float64)


register(Rerun(name="method1", sublayer="mlp", earlier_weights=sum_of_earlier))
register(Rerun(name="method2", sublayer="attention", earlier_weights=sum_of_earlier))
register(Rerun(name="method3.1", sublayer="mlp", earlier_weights=mean_of_earlier))
register(Rerun(name="method3.2", sublayer="mlp", earlier_weights=softmax_of_earlier, weights=ALPHA))
register(Rerun(name="method4.1", sublayer="attention", earlier_weights=mean_of_earlier))
register(Rerun(name="method4.2", sublayer="attention", earlier_weights=softmax_of_earlier, weights=ALPHA))
