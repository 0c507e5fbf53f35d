"""Multiway dense connections: the Q, K and V inputs of a layer's attention (and, for MUDDFormer, its
residual) are DIFFERENT per-token weighted sums of a stack of earlier outputs (docs/maths.md C5, C7).

What the two schemes share (this module's first part): the stack [L+1, b, s, h] of the embeddings
and the L layer outputs, a carry field written once (slot l + 1 by layer l), and the per-stream
mix `mix(stack, weights)`: x^c = sum_j weights[c, ..., j] stack[j], one input per stream c. The
attention reads its inputs as `ProjectionInputs(q, k, v)`: each normalised by the layer's
input_layernorm N1_l and projected by its own W_q, W_k, W_v (both papers keep one pre-norm per
block; MUDDFormer's code has a per-stream norm only as an option). Both are per position, so
decoding needs no cache beyond keys and values.

* `mudd`, MUDDFormer (Xiao et al., ICML 2025, arXiv 2502.12170, Sec. 2.2-2.3; code
  Caiyun-AI/MUDDFormer). The stack holds the streams X_0 (embeddings), X_1 = Block_0(.), ...
  After block l, for the streams c of `mudd_streams` (a subset of Q, K, V, R):

      A_l = GELU(rmsnorm(X_{l+1}) W1_l) W2_l + b_l     [C, l+2] per position (the DA module)
      X^c_{l+1} = sum_{j <= l+1} A_l[c, j] X_j

  and block l+1 is  H = X^R + Attn(N1(X^Q), N1(X^K), N1(X^V)),  X_{l+2} = H + MLP(N2(H)).
  rmsnorm has no scale (as the code's RMSnormNoscale); GELU is the exact (erf) one; W1 has
  C (l+2) hidden units (the code's width: here a [h, C (L+1)] kernel whose units beyond C (l+2)
  are masked to 0, one shape for the layer scan). A stream outside `mudd_streams` reads X_{l+1}
  (the standard residual). Static-only (`mudd_static`): A_l = b_l. Init: W2 = 0,
  b_l one-hot on j = l+1, W1 ~ N(0, initializer_range): the standard model at init. The model
  outputs X^R after the last layer's DA (the code's `x[0]` of its last DA, whose one output is R).
* `dca`, DeepCrossAttention (Heddes et al., ICML 2025, arXiv 2502.06785, Sec. 3, GRN-v3 and
  DCA; k-DCA of Sec. 5). The stack holds z_0 = the embeddings and the layer outputs
  z_{j+1} = a_j + m_j (a layer's attention plus MLP output; the standard stream is their sum
  X_l = sum_{j<=l} z_j). Block l reads, per stream c in Q, K, V (three GRN-v3),

      x^c = sum_{j <= l} (relu(w_{l,c} . rmsnorm(z_j)) + b_{l,c,j}) * z_j      (b_{l,c,j} in R^h)

  then a = Attn(N1(x^Q), N1(x^K), N1(x^V)), H = x^Q + a (the query input is the attention's
  residual), m = MLP(N2(H)), z_{l+1} = a + m. With `dca_k = k` (k-DCA) only the first k and the
  last k entries of the stack are weighted so; the entries between are summed with weight 1
  (standard ResNet addition). The model outputs the standard sum X_L = sum_j z_j. Init: b = 1,
  w = 0, so x^c = X_l: the standard model. relu here has derivative 1 at 0 (the subgradient
  x >= 0), or w = 0 would never move; docs/maths.md C7 lists the other choices.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jax_residual import sharding
from jax_residual.connections.base import (Connection, LayerContext, ProjectionInputs, State, StateField, Weight,
                                           at_least, observe, register)
from jax_residual.functional import rms_normalize

# ----------------------------------------------------------------------------- shared: the stack and the mix


def stack_field() -> StateField:
    """The stack [L+1, b, s, h]: slot 0 the embeddings, slot l + 1 written by layer l."""
    return StateField(lambda c, b, s: (c.num_hidden_layers + 1, b, s, c.hidden_size),
                      ("layers", "batch", "seq", "embed"), initial=lambda x, zeros: zeros.at[0].set(x))


def mix(stack, weights):
    """x^c = sum_j weights[c, j] stack[j]: stack [L+1, b, s, h], weights [C, L+1] (static) or
    [C, b, s, L+1] (per position), float32 (cast to the stack's dtype). Returns [C, b, s, h]."""
    spec = "cj,jbsh->cbsh" if weights.ndim == 2 else "cbsj,jbsh->cbsh"
    return jnp.einsum(spec, weights.astype(stack.dtype), stack)


def normalized(x, cfg):
    """rmsnorm without a scale, float32 [..., h]."""
    return rms_normalize(x, cfg.hidden_size, cfg.rms_norm_eps)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Multiway(Connection):
    """The shared declaration: the stack as carry."""

    def state_fields(self, cfg) -> dict[str, StateField]:
        return {"layer_outputs": stack_field()}


# ----------------------------------------------------------------------------- MUDDFormer

MUDD_STREAMS = "qkvr"


def _check_streams(knobs):
    streams = knobs.mudd_streams
    if not streams or any(s not in MUDD_STREAMS for s in streams) or \
            list(streams) != sorted(set(streams), key=MUDD_STREAMS.index):
        raise ValueError(f"mudd_streams must be a non-empty subset of {MUDD_STREAMS!r} in that order "
                         f"(e.g. 'qkvr', 'vr'), got {streams!r}")


@dataclasses.dataclass(frozen=True)
class MuddKnobs:
    """MUDDFormer's ablations: the dense streams, and dynamic (per position) or static weights."""

    mudd_streams: str = dataclasses.field(
        default=MUDD_STREAMS, metadata={"help": "mudd: the input streams with dense connections, a subset of "
                                                "qkvr (query, key, value, residual); the others read X_{l+1}"})
    mudd_static: bool = dataclasses.field(
        default=False, metadata={"help": "mudd: static dense weights only (no per-position DA module)"})

    __post_init__ = _check_streams


def _mudd_width(cfg) -> int:
    """C (L+1): the DA's widest hidden layer (C = the dense streams), at the last layer."""
    return len(cfg.knobs.mudd_streams) * (cfg.num_hidden_layers + 1)


def _mudd_bias(cfg):
    """b_l [L, C, L+1]: one-hot on the newest output j = l + 1 for every stream."""
    L, C = cfg.num_hidden_layers, len(cfg.knobs.mudd_streams)
    return np.repeat(np.eye(L, L + 1, k=1, dtype=np.float32)[:, None], C, axis=1)


def _is_dynamic(cfg) -> bool:
    return not cfg.knobs.mudd_static


def plotted_stream(cfg) -> int:
    """The stream whose weights the plots show: R, or the first dense stream where R has none."""
    streams = cfg.knobs.mudd_streams
    return streams.index("r") if "r" in streams else 0


def mudd_weights(x, l, p, cfg):
    """A_l [C, b, s, L+1] (static: [C, L+1]) of the streams after block l, from its output
    x = X_{l+1} [b, s, h]; 0 beyond j = l + 1."""
    L, C = cfg.num_hidden_layers, len(cfg.knobs.mudd_streams)
    weights = p["mudd_bias"].astype(jnp.float32)
    if _is_dynamic(cfg):
        hidden = jax.nn.gelu(normalized(x, cfg) @ p["mudd_w1"].astype(jnp.float32), approximate=False)
        hidden = jnp.where(jnp.arange(_mudd_width(cfg)) < C * (l + 2), hidden, 0.0)  # the DA's C (l+2) units
        weights = jnp.einsum("bsk,kcj->cbsj", hidden, p["mudd_w2"].astype(jnp.float32)) + weights[:, None, None, :]
    read = jnp.arange(L + 1) <= l + 1
    return jnp.where(read, weights, 0.0)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MUDD(Multiway):
    """The stream is the four inputs (X^Q, X^K, X^V, X^R) of the next block, [4, b, s, h]."""

    knobs: type = MuddKnobs

    def enter(self, x, cfg, mesh=None):
        return sharding.constrain(jnp.broadcast_to(x, (len(MUDD_STREAMS), *x.shape)),
                                  ("streams", "batch", "seq", "embed"), mesh)

    def leave(self, stream):
        return stream[MUDD_STREAMS.index("r")]

    def connect(self, sublayer: str, stream, state: State, ctx: LayerContext):
        if sublayer == "mlp":
            return super().connect(sublayer, stream, state, ctx)
        residual = stream[MUDD_STREAMS.index("r")]
        return ProjectionInputs(*stream[:3]), lambda out: residual + out, state

    def after_block(self, x, state: State, ctx: LayerContext):
        stack = state["layer_outputs"].at[ctx.index + 1].set(x)
        weights = mudd_weights(x, ctx.index, ctx.params, ctx.cfg)
        dense = mix(stack, weights)
        streams = ctx.cfg.knobs.mudd_streams
        inputs = [dense[streams.index(s)] if s in streams else x for s in MUDD_STREAMS]
        plotted = weights[plotted_stream(ctx.cfg)]
        state = observe({**state, "layer_outputs": stack}, ctx, plotted if plotted.ndim == 1 else plotted.mean((0, 1)))
        return jnp.stack(inputs), state

    def observes_weights(self, cfg) -> bool:
        """Dynamic: A_l per position. Row l: the mean of A_l[c, j] over tokens for the plotted
        stream c (`plotted_stream`), columns j = 0 .. L (X_0 the embeddings); 0 for j > l + 1."""
        return _is_dynamic(cfg)

    def flops(self, cfg, seq: int) -> dict[str, float]:
        """Per token, forward + backward (x 3) multiply-adds (x 2): after block l the mix of
        C streams over l + 2 outputs (C (l+2) h), and, dynamic, the DA's h x C(l+2) and
        C(l+2) x C(l+2) matmuls (norm and GELU not counted, as train/flops.py ignores them)."""
        C, h = len(cfg.knobs.mudd_streams), cfg.hidden_size
        per_layer = [C * (l + 2) * h + (h * C * (l + 2) + (C * (l + 2)) ** 2 if _is_dynamic(cfg) else 0)
                     for l in range(cfg.num_hidden_layers)]
        return {"connections": 6.0 * sum(per_layer)}

    def learned_matrix(self, params: dict, cfg) -> np.ndarray:
        """[L, L+1]: static MUDD's weights b_l[R, j] of the residual stream (the first dense
        stream where R has none); dynamic MUDD is plotted from `observes_weights` instead."""
        bias = np.asarray(params["mudd_bias"], np.float64)[:, plotted_stream(cfg)]
        L = cfg.num_hidden_layers
        return np.where(np.arange(L + 1)[None] <= np.arange(L)[:, None] + 1, bias, 0.0)


register(MUDD(name="mudd", weights={
    "mudd_bias": Weight(_mudd_bias, ("streams", "earlier_layers")),
    "mudd_w1": Weight(lambda cfg: np.zeros((cfg.num_hidden_layers, cfg.hidden_size, _mudd_width(cfg)), np.float32),
                      ("connection_embed", "stream_inputs"), _is_dynamic, init_std=lambda cfg: cfg.initializer_range),
    "mudd_w2": Weight(lambda cfg: np.zeros((cfg.num_hidden_layers, _mudd_width(cfg), len(cfg.knobs.mudd_streams),
                                            cfg.num_hidden_layers + 1), np.float32),
                      ("stream_inputs", "streams", "earlier_layers"), _is_dynamic),
}))

# ----------------------------------------------------------------------------- DeepCrossAttention

DCA_STREAMS = "qkv"


@dataclasses.dataclass(frozen=True)
class DcaKnobs:
    """k-DCA (None: every earlier output in the GRNs, the paper's DCA)."""

    dca_k: int | None = dataclasses.field(
        default=None, metadata={"help": "dca: only the first K and the last K layer outputs get learned weights, "
                                        "the ones between are summed (k-DCA); default: all of them"})

    __post_init__ = at_least(1, "dca_k")


def grn_entries(l, cfg):
    """(weighted, summed), boolean [L+1]: the stack entries j <= l that layer l's GRNs weigh, and
    those that k-DCA sums with weight 1 (none without dca_k)."""
    j, k = jnp.arange(cfg.num_hidden_layers + 1), cfg.knobs.dca_k
    earlier = j <= l
    if k is None:
        return earlier, jnp.zeros_like(earlier)
    weighted = earlier & ((j < k) | (j > l - k))
    return weighted, earlier & ~weighted


def relu_open_at_zero(x):
    """max(x, 0), with derivative 1 at x = 0 (so that w = 0 trains)."""
    return jnp.where(x >= 0, x, 0.0)


def grn_weights(stack, l, p, cfg):
    """Layer l's GRN-v3 weights over stack [L+1, b, s, h], float32: (the gates relu(w_c . rmsnorm(z_j))
    [3, b, s, L+1] (1 for the entries k-DCA sums, 0 for j > l), the biases b_{l,c,j} [3, L+1, h]
    (0 but for the weighted entries)). The weight of z_j in x^c, per channel, is their sum."""
    weighted, summed = grn_entries(l, cfg)
    gates = relu_open_at_zero(jnp.einsum("jbsh,ch->cbsj", normalized(stack, cfg), p["dca_w"].astype(jnp.float32)))
    gates = jnp.where(weighted, gates, jnp.where(summed, 1.0, 0.0))
    return gates, jnp.where(weighted[:, None], p["dca_bias"].astype(jnp.float32), 0.0)


def grn_inputs(stack, gates, bias):
    """The three GRN-v3 outputs x^Q, x^K, x^V [3, b, s, h] of `grn_weights` over stack [L+1, b, s, h]."""
    return mix(stack, gates) + jnp.einsum("cjh,jbsh->cbsh", bias.astype(stack.dtype), stack)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DCA(Multiway):
    """The stream is the standard sum X_l = sum_{j<=l} z_j [b, s, h] (what the model outputs);
    between the sub-layers it is [x^Q + a, a] [2, b, s, h], so that the MLP writes z_{l+1} = a + m."""

    knobs: type = DcaKnobs

    def connect(self, sublayer: str, stream, state: State, ctx: LayerContext):
        if sublayer == "mlp":
            return stream[0], lambda out: stream[1] + out, state
        gates, bias = grn_weights(state["layer_outputs"], ctx.index, ctx.params, ctx.cfg)
        q, k, v = grn_inputs(state["layer_outputs"], gates, bias)
        query = DCA_STREAMS.index("q")
        state = observe(state, ctx, gates[query].mean((0, 1)) + bias[query].mean(-1))
        return ProjectionInputs(q, k, v), lambda out: jnp.stack([q + out, out]), state

    def observes_weights(self, cfg) -> bool:
        """Per-token gates. Row l: the weight layer l's query GRN gives z_j (columns j = 0 .. L),
        relu(w . rmsnorm(z_j)) + b_j averaged over tokens and the h channels of b_j (1 for the
        entries k-DCA sums, 0 for j > l)."""
        return True

    def after_block(self, x, state: State, ctx: LayerContext):
        """x = z_{l+1} = a + m: into the stack; the stream becomes X_{l+1} = X_l + z_{l+1}."""
        return ctx.layer_input + x, {**state, "layer_outputs": state["layer_outputs"].at[ctx.index + 1].set(x)}

    def flops(self, cfg, seq: int) -> dict[str, float]:
        """Per token, forward + backward (x 3) multiply-adds (x 2): layer l's three GRNs over its
        weighted entries, 3 h for the gates w . rmsnorm(z_j) and 2 x 3 h for the gated and the
        biased sums per entry, plus h per summed entry of k-DCA."""
        h, terms = cfg.hidden_size, 0
        for l in range(cfg.num_hidden_layers):
            weighted, summed = (int(np.sum(np.asarray(m))) for m in grn_entries(l, cfg))
            terms += 9 * h * weighted + h * summed
        return {"connections": 6.0 * terms}


register(DCA(name="dca", weights={
    "dca_w": Weight(lambda cfg: np.zeros((cfg.num_hidden_layers, len(DCA_STREAMS), cfg.hidden_size), np.float32),
                    ("streams", "connection_embed")),
    "dca_bias": Weight(lambda cfg: np.ones((cfg.num_hidden_layers, len(DCA_STREAMS), cfg.num_hidden_layers + 1,
                                            cfg.hidden_size), np.float32),
                       ("streams", "earlier_layers", "connection_embed")),
}))
