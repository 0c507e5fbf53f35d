"""The residual-method Llama decoder: one `lax.scan` over layers (docs/maths.md B, C).

The scan carry is (X_l, state): the residual stream X_l [b, s, h] ([n, b, s, h] for a method
with `streams`) and the fields the method declares (`ResidualMethod.state_fields`), e.g. the
post-RoPE Q and K of every layer so far (fixed [L, ...] buffers filled as the scan advances)
for the methods that look back. Layer i's attention probabilities are never stored:
P_i = softmax(Q_i K_i^T / sqrt(hd) + mask) is recomputed from them, so that state is
O(L b s h), linear in sequence length.

Per layer l (see residual.py for the rules that differ between methods):
    a_l = Attn_l(N1_l(X_l))                 scores sum_i sigma_{l,i} Q_i K_i^T (method 5),
                                            values mixed with layer 0's (value residual)
    H_l = R_attn + a_l                      R_attn = X_l, or sum_{i<l} w_{l,i} A~_i(X_l)
    X_{l+1} = R_mlp + MLP_l(N2_l(H_l))      R_mlp = H_l, or sum_{i<l} w_{l,i} M~_i(X_l)
    X_{l+1} <- sum_j alpha_{l,j} Z_j        over the embeddings and block outputs (DenseFormer)
With `streams` each sub-layer instead reads its input from, and writes its output into, the
n-wide stream through the method's connection (hyper-connections).
"""

from __future__ import annotations

import functools
import typing

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.sharding import Mesh

from jax_residual import functional as F
from jax_residual import sharding
from jax_residual.config import ModelConfig
from jax_residual.embedding import ParallelVocabEmbedding, VocabEmbedding
from jax_residual.norm import GroupRMSNorm
from jax_residual.residual import ResidualMethod, get_method, rerun_layers, standard_scales, stored_attention_fields
from jax_residual.sharding import explicit_mesh_context, with_auto_axes

State = dict[str, jax.Array]


# ----------------------------------------------------------------------------- parameters


def layer_param_specs(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], tuple[str, ...], typing.Callable]]:
    """name -> (stacked shape [L, ...], logical axes, initializer) of every per-layer parameter.

    Kernels are [in, out] (the transpose of torch's Linear.weight).
    """
    L, h, i = cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size
    q_dim, kv_dim = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    normal, ones = nn.initializers.normal(cfg.initializer_range), nn.initializers.ones
    specs = {
        "input_layernorm": ((L, h), ("layers", "norm"), ones),
        "q_proj": ((L, h, q_dim), ("layers", "embed", "heads"), normal),
        "k_proj": ((L, h, kv_dim), ("layers", "embed", "kv"), normal),
        "v_proj": ((L, h, kv_dim), ("layers", "embed", "kv"), normal),
        "o_proj": ((L, q_dim, h), ("layers", "heads", "embed"), normal),
        "post_attention_layernorm": ((L, h), ("layers", "norm"), ones),
        "gate_proj": ((L, h, i), ("layers", "embed", "mlp"), normal),
        "up_proj": ((L, h, i), ("layers", "embed", "mlp"), normal),
        "down_proj": ((L, i, h), ("layers", "mlp", "embed"), normal),
    }
    for name, weight in get_method(cfg.residual_method).weights_for(cfg).items():
        value = weight.init(cfg)
        specs[name] = (value.shape, ("layers", *weight.axes), lambda key, shape, dtype, v=value: jnp.asarray(v, dtype))
    return specs


# ----------------------------------------------------------------------------- one layer


def project_qkv(y, p, cos, sin, cfg: ModelConfig):
    """Q, K (post-RoPE) and V of y [b, s, h]: [b, s, nh, hd], [b, s, nkv, hd], [b, s, nkv, hd].

    The projections run on the flattened tokens [b*s, h] (2-D matmuls; see F.swiglu).
    """
    b, s, h = y.shape
    tokens = y.reshape(b * s, h)
    q = (tokens @ p["q_proj"]).reshape(b, s, cfg.num_attention_heads, cfg.head_dim)
    k = (tokens @ p["k_proj"]).reshape(b, s, cfg.num_key_value_heads, cfg.head_dim)
    v = (tokens @ p["v_proj"]).reshape(b, s, cfg.num_key_value_heads, cfg.head_dim)
    return F.apply_rotary_pos_emb(q, cos, sin), F.apply_rotary_pos_emb(k, cos, sin), v


SCORE_PREFIX_BUCKETS = 4


def accumulated_score_attention(state: State, layer, v, scales, cfg: ModelConfig):
    """softmax(sum_i scales_i Q_i K_i^T + mask) V for the stored Q/K of `state`
    ([L, b, s, n, hd]), scales [L] zero for i > l, and v [b, s, nkv, hd]. Returns [b, s, nh, hd].

    The weighted score sum is ONE contraction over (layer, head dim): the dot product of the
    concatenations [scales_0 Q_0, ..., scales_n Q_n] and [K_0, ..., K_n] (docs/maths.md B4), over
    only a prefix of the stored layers: the shortest of SCORE_PREFIX_BUCKETS static prefixes
    ceil(j L / 4), j = 1..4, that holds layers 0..l (`lax.switch`: four attention calls in the
    HLO whatever L is), so layer l contracts about the layers it sums, not all L. The switch is
    checkpointed (differentiated inside the scan it would keep every branch's residuals). The
    float32 scales multiply the queries in float32 (one rounding to the compute dtype); the
    score sum accumulates in float32.
    """
    stored_q, stored_k = state["stored_q"], state["stored_k"]
    L, b, s, nh, hd = stored_q.shape
    lengths = [-(-j * L // SCORE_PREFIX_BUCKETS) for j in range(1, SCORE_PREFIX_BUCKETS + 1)]

    def prefix_attention(n):
        def attend(v):
            q = (stored_q[:n].astype(jnp.float32) * scales[:n, None, None, None, None]).astype(stored_q.dtype)
            q_cat = jnp.moveaxis(q, 0, -2).reshape(b, s, nh, n * hd)
            k_cat = jnp.moveaxis(stored_k[:n], 0, -2).reshape(b, s, stored_k.shape[-2], n * hd)
            return F.causal_attention(q_cat, k_cat, v, 1.0, cfg.attention_block_size)

        return attend

    shortest = jnp.sum(jnp.asarray(lengths) <= layer)  # the first prefix with length > l
    return jax.checkpoint(lambda v: jax.lax.switch(shortest, [prefix_attention(n) for n in lengths], v))(v)


def rerun_values(x_hat, p, cfg: ModelConfig):
    """V of C earlier layers re-run on the current input: N1_c(x) Wv_c for x's shared
    normalisation x_hat [b, s, h] and layer params p stacked [C, ...] -> [C, b, s, nkv, hd].

    N1_c(x) = x_hat * gamma_c, so gamma_c is folded into Wv_c: one matmul gives every value.
    """
    b, s, _ = x_hat.shape
    v = jnp.einsum("bsh,chk->cbsk", x_hat, p["input_layernorm"][:, :, None] * p["v_proj"])
    return v.reshape(-1, b, s, cfg.num_key_value_heads, cfg.head_dim)


def rerun_outputs(x, heads, p, w, output: str, cfg: ModelConfig):
    """sum_c w_c A~_c(x) (output="attention") or sum_c w_c M~_c(x) (output="mlp") from the re-run
    attention heads [C, b, s, nh, hd] = P_c . V_c of C earlier layers (params p stacked [C, ...],
    weights w [C]); x [b, s, h].

    A~_c(x) = heads_c Wo_c,  M~_c(x) = MLP_c(N2_c(x + A~_c(x))). The attention output sum is one
    contraction over (layer, head dims); the MLP re-runs are C 2-D matmul chains on the
    flattened tokens (batched [C, t, i] weight gradients are slow on XLA:CPU, see
    benchmarks/README.md). The weights w stay float32 and so does the weighted sum (returned
    float32 [b, s, h]).
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


def rerun_heads(attention: tuple, v, cfg: ModelConfig):
    """The heads P_c V [C, b, s, nh, hd] of a chunk of C earlier layers with new values
    v [C, b, s, nkv, hd]: `attention` is the chunk's stored (q, k) ("qk": causal attention,
    P_c recomputed) or (probs,) ("probs": one product)."""
    if cfg.attention_state == "qk":
        q, k = attention
        return F.causal_attention(q, k, v, F.default_attention_scale(cfg.head_dim), cfg.attention_block_size)
    (probs,) = attention
    return F.probs_attention(probs, v)


def stored_for_rerun(state: State, cfg: ModelConfig) -> tuple:
    """The [L, ...] state arrays a re-run reads: (stored_q, stored_k) or (stored_probs,)."""
    if cfg.attention_state == "qk":
        return state["stored_q"], state["stored_k"]
    return (state["stored_probs"],)


def recompute_chunk(x, x_hat, attention: tuple, p, w, output: str, cfg: ModelConfig):
    """sum_c w_c A~_c(x) or sum_c w_c M~_c(x) (`rerun_outputs`) over a chunk of C earlier layers
    from their stored attention (`rerun_heads`): one attention call covers the chunk. x [b, s, h]
    and its shared normalisation x_hat."""
    v = rerun_values(x_hat.astype(x.dtype), p, cfg)
    return rerun_outputs(x, rerun_heads(attention, v, cfg), p, w, output, cfg)


def recompute_earlier(x, state: State, layers, rerun, weights, output: str, cfg: ModelConfig):
    """sum_i w_i A~_i(x) or w_i M~_i(x) over the re-run layers i (`rerun` [L] boolean, weights
    [L] zero elsewhere), in chunks of C layers.

    The candidates are layers 0, p, 2p, ... (p = `rerun_every`, default 1: all), sliced
    statically; an inner scan walks them C at a time, and `lax.cond` skips a chunk that holds
    no re-run layer (at or after the current layer, or before the `rerun_window`). So layer l
    runs ceil(l/C) chunks (at most C-1 wasted layers; none at the default C = 1) and the HLO
    holds one chunk body whatever L is. The sum accumulates in float32; returns x.dtype.

    With "qk" state and remat "recompute"/"layer" a chunk is checkpointed (its activations are
    recomputed in the backward pass). With "probs" the stack is already the `stateful_stack`
    (the state is `final_only`), which differentiates one layer at a time: the chunk keeps its
    activations for that layer's backward, and P_i V is not run a third time.
    """
    x_hat = F.rms_normalize(x, cfg.hidden_size, cfg.rms_norm_eps)
    compute = recompute_chunk
    if cfg.remat in ("recompute", "layer") and cfg.attention_state == "qk":
        compute = jax.checkpoint(recompute_chunk, static_argnums=(5, 6))

    def chunks(a):
        candidates = a[::cfg.rerun_every]
        return candidates.reshape(-1, cfg.recompute_chunk_size, *candidates.shape[1:])

    def step(total, xs):
        rerun, attention, p, w = xs
        contribution = jax.lax.cond(
            jnp.any(rerun),
            lambda: compute(x, x_hat, attention, p, w, output, cfg),
            lambda: jnp.zeros(x.shape, jnp.float32),
        )
        return total + contribution, None

    recompute_params = {name: layers[name] for name in RECOMPUTE_PARAM_NAMES}
    xs = jax.tree.map(chunks, (rerun, stored_for_rerun(state, cfg), recompute_params, weights))
    total, _ = jax.lax.scan(step, jnp.zeros(x.shape, jnp.float32), xs)
    return total.astype(x.dtype)


RECOMPUTE_PARAM_NAMES = ("input_layernorm", "v_proj", "o_proj", "post_attention_layernorm",
                         "gate_proj", "up_proj", "down_proj")


class StoredAttention:
    """What a layer keeps for later layers in a full-sequence forward pass: the fields of
    `stored_attention_fields` for the config's (resolved) `attention_state`. "qk": the post-RoPE
    Q/K of every layer, from which P_i and S_i are recomputed; "probs": P_i itself (methods
    1-4), the running raw-score sum (5.1-5.4) or every layer's raw scores (5.5). Attention is
    causal over the sequence itself."""

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg

    def write(self, state: State, layer, q, k, v) -> State:
        if "stored_q" in state:
            return {**state, "stored_q": state["stored_q"].at[layer].set(q), "stored_k": state["stored_k"].at[layer].set(k)}
        if not {"stored_probs", "score_sum", "stored_scores"} & state.keys():
            return state
        scores = F.grouped_scores(q, k)
        if "stored_probs" in state:
            probs = F.causal_softmax(scores * F.default_attention_scale(self.cfg.head_dim))
            return {**state, "stored_probs": state["stored_probs"].at[layer].set(probs.astype(v.dtype))}
        if "score_sum" in state:
            return {**state, "score_sum": state["score_sum"] + scores}
        return {**state, "stored_scores": state["stored_scores"].at[layer].set(scores)}

    def attend(self, state: State, layer, q, k, v):
        """Layer l's own attention: q [b, s, nh, hd], k, v [b, s, nkv, hd] -> [b, s, nh, hd]."""
        if "stored_probs" in state:
            return F.probs_attention(state["stored_probs"][layer], v)
        return F.causal_attention(q, k, v, F.default_attention_scale(self.cfg.head_dim), self.cfg.attention_block_size)

    def attend_summed_scores(self, state: State, layer, v, scales):
        """softmax(sum_i scales_i S_i + mask) V (method 5), v [b, s, nkv, hd], scales [L]."""
        if "score_sum" in state:  # uniform scales: sigma_l * sum_{i<=l} S_i
            return F.probs_attention(F.causal_softmax(state["score_sum"] * scales[layer]), v)
        if "stored_scores" in state:
            return F.probs_attention(F.causal_softmax(jnp.einsum("l,l...->...", scales, state["stored_scores"])), v)
        return accumulated_score_attention(state, layer, v, scales, self.cfg)

    def rerun(self, x, state: State, layers, layer, rerun, weights, output: str):
        """(sum_i w_i A~_i(x) or w_i M~_i(x) over the re-run layers, state)."""
        return recompute_earlier(x, state, layers, rerun, weights, output, self.cfg), state


class DecodeCache:
    """What a layer keeps for later layers and later tokens when decoding: the tokens at
    positions [t, t + n) of a sequence whose earlier positions are cached (causality makes
    them final). Cache fields ([L, ...] per layer, T = the cache's length):

      cache_k, cache_v [L, b, T, nkv, hd]   post-RoPE keys and the values of every layer
      rerun_v [L, L, b, T, nkv, hd]         methods 1-4: values N1_i(X_l) Wv_i of earlier
                                            layer i re-run at layer l (pair (l, i))
    and per step `step_q` [L, b, n, nh, hd], every layer's queries of the new tokens (methods
    1-5: P_i's rows of the new tokens are softmax(q_i K_i^T) over the cached keys). Method 5
    reads the cached keys of every layer. Re-runs run over all L earlier layers with weight 0
    beyond the re-run ones (decoding is not where that costs).
    """

    def __init__(self, cfg: ModelConfig, method: ResidualMethod, start):
        self.cfg, self.method, self.start = cfg, method, start

    def positions(self, count: int):
        return self.start + jnp.arange(count)

    def _append(self, cache, layer, new):
        """cache [L, b, T, ...] with new [b, n, ...] written at [layer, :, start:start + n]."""
        return cache.at[layer].set(jax.lax.dynamic_update_slice_in_dim(cache[layer], new, self.start, 1))

    def write(self, state: State, layer, q, k, v) -> State:
        state = {**state, "cache_k": self._append(state["cache_k"], layer, k),
                 "cache_v": self._append(state["cache_v"], layer, v)}
        if "step_q" in state:
            state["step_q"] = state["step_q"].at[layer].set(q)
        return state

    def _attend(self, q, k, v, scale):
        return F.attention_at_positions(q, k, v, scale, self.positions(q.shape[-3]))

    def attend(self, state: State, layer, q, k, v):
        return self._attend(q, state["cache_k"][layer], state["cache_v"][layer],
                            F.default_attention_scale(self.cfg.head_dim))

    def attend_summed_scores(self, state: State, layer, v, scales):
        q, k = state["step_q"], state["cache_k"]
        L, b, n, nh, hd = q.shape
        q_cat = jnp.moveaxis(q * scales.astype(q.dtype)[:, None, None, None, None], 0, -2).reshape(b, n, nh, L * hd)
        k_cat = jnp.moveaxis(k, 0, -2).reshape(b, k.shape[2], k.shape[-2], L * hd)
        return self._attend(q_cat, k_cat, state["cache_v"][layer], 1.0)

    def rerun(self, x, state: State, layers, layer, rerun, weights, output: str):
        p = {name: layers[name] for name in RECOMPUTE_PARAM_NAMES}
        v_new = rerun_values(F.rms_normalize(x, self.cfg.hidden_size, self.cfg.rms_norm_eps).astype(x.dtype), p, self.cfg)
        rerun_v = state["rerun_v"].at[layer].set(
            jax.lax.dynamic_update_slice_in_dim(state["rerun_v"][layer], v_new, self.start, 2))
        heads = self._attend(state["step_q"], state["cache_k"], rerun_v[layer], F.default_attention_scale(self.cfg.head_dim))
        return rerun_outputs(x, heads, p, weights, output, self.cfg).astype(x.dtype), {**state, "rerun_v": rerun_v}


def empty_cache(cfg: ModelConfig, batch: int, length: int, dtype=jnp.float32) -> State:
    """A decoding cache for `batch` sequences of up to `length` tokens (see `DecodeCache`), and
    "length": int32 [] the number of positions filled."""
    L, nkv, hd = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
    cache = {"length": jnp.zeros((), jnp.int32),
             "cache_k": jnp.zeros((L, batch, length, nkv, hd), dtype),
             "cache_v": jnp.zeros((L, batch, length, nkv, hd), dtype)}
    if get_method(cfg.residual_method).recompute is not None:
        cache["rerun_v"] = jnp.zeros((L, L, batch, length, nkv, hd), dtype)
    return cache


def decoder_layer(x, state: State, layer, p, layers, cos, sin, cfg: ModelConfig, method: ResidualMethod,
                  mesh: Mesh | None = None, memory: StoredAttention | DecodeCache | None = None):
    """One layer l of docs/maths.md B0/B2 (and C). x: the residual stream X_l [b, s, h] ([n, b, s, h]
    with `method.streams`); state: the method's carry fields; p: this layer's params; layers:
    all layers' params stacked [L, ...] (for re-running earlier layers). Activations (Q/K/V,
    attention output, MLP hidden) and the written carry are constrained to their logical axes on
    `mesh` (sharding.py; no-op without one). memory: how attention is stored and read (default:
    a full-sequence pass, `StoredAttention`). Returns (X_{l+1}, state)."""
    memory = StoredAttention(cfg) if memory is None else memory
    L, norm_eps, hidden = cfg.num_hidden_layers, cfg.rms_norm_eps, cfg.hidden_size
    first = layer == 0  # layer 0 attends and connects like the standard layer
    layer_input = x

    def attention(y, state):
        b, s, _ = y.shape
        q, k, v = project_qkv(F.group_rms_norm(y, p["input_layernorm"], hidden, norm_eps), p, cos, sin, cfg)
        q = sharding.constrain(q, ("batch", "seq", "heads", "head_dim"), mesh)
        k, v = (sharding.constrain(a, ("batch", "seq", "kv_heads", "head_dim"), mesh) for a in (k, v))
        if method.mix_values is not None:
            state = {**state, "first_values": jnp.where(first, v, state["first_values"])}
            v = jnp.where(first, v, method.mix_values(v, state["first_values"], p))
        state = memory.write(state, layer, q, k, v)
        if method.score_scales is not None:
            scales = jnp.where(first, standard_scales(layer, p, L, cfg.head_dim),
                               method.score_scales(layer, p, L, cfg.head_dim))
            heads = memory.attend_summed_scores(state, layer, v, scales)
        else:
            heads = memory.attend(state, layer, q, k, v)
        out = (heads.reshape(b * s, -1) @ p["o_proj"]).reshape(b, s, -1)
        return sharding.constrain(out, ("batch", "seq", "embed"), mesh), state

    def mlp(y):
        hidden_axes = ("batch", "mlp")  # [b*s, i]: the flattened tokens split like the batch
        return F.swiglu(F.group_rms_norm(y, p["post_attention_layernorm"], hidden, norm_eps),
                        p["gate_proj"], p["up_proj"], p["down_proj"],
                        constrain_hidden=lambda a: sharding.constrain(a, hidden_axes, mesh))

    def connect(sublayer: str, stream, state):
        """(the sub-layer's input, write(out) -> the stream after it, state)."""
        if method.streams is not None:
            return *method.streams.connect(stream, sublayer, p, cfg), state
        if method.recompute != sublayer:
            return stream, lambda out: stream + out, state
        rerun = rerun_layers(layer, L, cfg.rerun_window, cfg.rerun_every)
        weights = method.earlier_weights(layer, rerun, p)
        recomputed, state = memory.rerun(layer_input, state, layers, layer, rerun, weights, sublayer)
        residual = jnp.where(jnp.any(rerun), recomputed, stream)
        return stream, lambda out: residual + out, state

    y, write, state = connect("attention", x, state)
    attn_out, state = attention(y, state)
    h = write(attn_out)
    y, write, state = connect("mlp", h, state)
    x = write(mlp(y))
    if method.mix_blocks is not None:
        blocks = state["block_outputs"].at[layer + 1].set(x)
        alpha = method.mix_blocks(layer, p, cfg).astype(x.dtype)
        x, state = jnp.einsum("j,j...->...", alpha, blocks), {**state, "block_outputs": blocks}
    return x, constrain_state(state, cfg, method, mesh)


def constrain_state(state: State, cfg: ModelConfig, method: ResidualMethod, mesh: Mesh | None) -> State:
    """Each carry field constrained to its declared logical axes (`StateField.axes`) on `mesh`."""
    if mesh is None:
        return state
    fields = method.state_fields(cfg)
    return {name: sharding.constrain(value, fields[name].axes, mesh) for name, value in state.items()}


def initial_state(x, cfg: ModelConfig, method: ResidualMethod, mesh: Mesh | None = None) -> State:
    """The method's carry fields before layer 0, from the embeddings x [b, s, h], each
    constrained to its logical axes on `mesh`."""
    b, s, _ = x.shape
    state = {}
    for name, field in method.state_fields(cfg).items():
        zeros = jnp.zeros(field.shape(cfg, b, s), x.dtype if field.dtype == "compute" else jnp.float32)
        state[name] = zeros if field.initial is None else field.initial(x.astype(zeros.dtype), zeros)
    return constrain_state(state, cfg, method, mesh)


def expand_stream(x, cfg: ModelConfig, method: ResidualMethod, mesh: Mesh | None = None):
    """The residual stream entering layer 0: x [b, s, h], or n copies [n, b, s, h] (`streams`)."""
    if method.streams is None:
        return x
    return sharding.constrain(jnp.broadcast_to(x, (method.streams.count(cfg), *x.shape)),
                              ("streams", "batch", "seq", "embed"), mesh)


def collapse_stream(stream, method: ResidualMethod):
    """The last layer's output [b, s, h]: the stream, or the mean of the n streams."""
    return stream if method.streams is None else stream.mean(axis=0)


def decode_stack(x, layers, cos, sin, cfg: ModelConfig, cache: State):
    """The layer scan over new tokens x [b, n, h] at positions cache["length"] + [0, n), reading
    and extending the decoding cache (`DecodeCache`). Returns ([b, n, h], the extended cache)."""
    method = get_method(cfg.residual_method)
    b, n, _ = x.shape
    per_token = cfg.replace(attention_state="qk")  # the stored attention is the cache's
    per_step = {name: value for name, value in initial_state(x, per_token, method).items()
                if name not in stored_attention_fields(per_token, method)}
    cached = {name: value for name, value in cache.items() if name != "length"}
    state = {**per_step, **cached}
    if method.stores_attention:
        state["step_q"] = jnp.zeros((cfg.num_hidden_layers, b, n, cfg.num_attention_heads, cfg.head_dim), x.dtype)
    memory = DecodeCache(cfg, method, cache["length"])

    def body(carry, xs):
        layer, p = xs
        return decoder_layer(*carry, layer, p, layers, cos, sin, cfg, method, memory=memory), None

    (stream, state), _ = jax.lax.scan(body, (expand_stream(x, cfg, method), state),
                                      (jnp.arange(cfg.num_hidden_layers), layers))
    return collapse_stream(stream, method), {"length": cache["length"] + n, **{k: state[k] for k in cached}}


def decoder_stack(x, layers, cos, sin, cfg: ModelConfig, mesh: Mesh | None = None):
    """All L layers as one scan. x [b, s, h]; layers: params stacked [L, ...]; mesh: where the
    activations and the carry are constrained (None: no constraint). Returns [b, s, h] (with
    `method.streams`: the mean of the last layer's n streams).

    `attention_state` "auto" is resolved here from x's batch and sequence length. The stack is
    the `stateful_stack` custom VJP (only the final state kept) when every state field is
    written once and remat="layer" asks for it or a field is `final_only`; otherwise the plain
    scan (its body checkpointed with remat="layer": an accumulated field, e.g. method 5's
    running score sum in "probs", is then saved at every layer, one layer's size each time).
    """
    cfg = cfg.with_attention_state(*x.shape[:2])
    method = get_method(cfg.residual_method)
    state = initial_state(x, cfg, method, mesh)
    fields = method.state_fields(cfg).values()
    stream = expand_stream(x, cfg, method, mesh)
    keep_final_only = cfg.remat == "layer" or any(field.final_only for field in fields)
    if state and keep_final_only and all(field.written_once for field in fields):
        stream = stateful_stack(stream, state, layers, cos, sin, cfg, mesh)
    else:
        def body(carry, xs):
            layer, p = xs
            return decoder_layer(*carry, layer, p, layers, cos, sin, cfg, method, mesh), None

        if cfg.remat == "layer":
            body = jax.checkpoint(body)
        (stream, _), _ = jax.lax.scan(body, (stream, state), (jnp.arange(cfg.num_hidden_layers), layers))
    return collapse_stream(stream, method)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def stateful_stack(x, state: State, layers, cos, sin, cfg: ModelConfig, mesh: Mesh | None):
    """The layer scan of a method with carry state, with layer rematerialisation that saves
    only each layer's input X_l and the final state (memory O(L b s h) plus one state).

    Differentiating the plain scan would save the whole state at every layer (O(L^2 b s n hd)
    for stored Q/K). Here the backward scan re-runs layer l from X_l against the *final*
    state: every field is written once (`StateField.written_once`), so the slots layer l reads
    hold what it read in the forward pass, the slots it writes are rewritten by the layer
    itself, and slots written later enter with weight 0; the function, and its gradient, are
    those of the forward pass. Returns the last layer's stream.
    """
    return _stateful_forward(x, state, layers, cos, sin, cfg, mesh)[0]


def _stateful_forward(x, state: State, layers, cos, sin, cfg: ModelConfig, mesh: Mesh | None):
    method = get_method(cfg.residual_method)

    def body(carry, xs):
        layer, p = xs
        return decoder_layer(*carry, layer, p, layers, cos, sin, cfg, method, mesh), carry[0]

    (x_out, state), inputs = jax.lax.scan(body, (x, state), (jnp.arange(cfg.num_hidden_layers), layers))
    return x_out, (inputs, state, layers, cos, sin)


def _stateful_backward(cfg: ModelConfig, mesh: Mesh | None, residuals, d_out):
    inputs, state, layers, cos, sin = residuals
    method = get_method(cfg.residual_method)

    def body(carry, xs):
        d_x, d_state, d_layers, d_cos, d_sin = carry
        layer, x, p = xs
        layer_fn = lambda x, state, p, layers, cos, sin: decoder_layer(x, state, layer, p, layers, cos, sin, cfg, method, mesh)
        _, vjp = jax.vjp(layer_fn, x, state, p, layers, cos, sin)
        d_x, d_state, d_p, d_layers_l, d_cos_l, d_sin_l = vjp((d_x, d_state))
        add = lambda a, b: jax.tree.map(jnp.add, a, b)
        return (d_x, d_state, add(d_layers, d_layers_l), d_cos + d_cos_l, d_sin + d_sin_l), d_p

    zeros = lambda tree: jax.tree.map(jnp.zeros_like, tree)
    carry = (d_out, zeros(state), zeros(layers), zeros(cos), zeros(sin))
    (d_x, d_state, d_layers, d_cos, d_sin), d_p = jax.lax.scan(
        body, carry, (jnp.arange(cfg.num_hidden_layers), inputs, layers), reverse=True)
    return d_x, d_state, jax.tree.map(jnp.add, d_layers, d_p), d_cos, d_sin


stateful_stack.defvjp(_stateful_forward, _stateful_backward)


def rope_ratio_for(seq_len: int, cfg: ModelConfig) -> float:
    """The NTK ratio serving `seq_len` positions, or a clear error if it exceeds the config."""
    covered = cfg.max_position_embeddings * cfg.rope_ntk_ratio
    if seq_len <= covered:
        return cfg.rope_ntk_ratio
    if not cfg.rope_dynamic_ntk:
        raise ValueError(
            f"sequence length {seq_len} exceeds max_position_embeddings * rope_ntk_ratio = {covered:g}; "
            "set rope_dynamic_ntk=True to extend RoPE with the NTK rule"
        )
    with jax.ensure_compile_time_eval():  # the length is static: a Python float, also under jit
        return float(F.ntk_ratio_for_length(cfg.max_position_embeddings, cfg.rope_ntk_ratio, seq_len))


# ----------------------------------------------------------------------------- the Flax model


class DecoderStack(nn.Module):
    """Declares the stacked [L, ...] layer parameters and runs `decoder_stack` over them."""

    config: ModelConfig
    mesh: Mesh | None = None

    @nn.compact
    def __call__(self, x, cos, sin, cache: State | None = None):
        """x [b, s, h] -> [b, s, h]; with a decoding `cache`, (x, the extended cache)."""
        cfg = self.config
        layers = {
            name: self.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)
            for name, (shape, axes, init) in layer_param_specs(cfg).items()
        }
        weights = get_method(cfg.residual_method).weights_for(cfg)  # connection weights stay float32
        layers = {name: value if name in weights else value.astype(x.dtype) for name, value in layers.items()}
        if cache is not None:
            return decode_stack(x, layers, cos, sin, cfg, cache)
        return decoder_stack(x, layers, cos, sin, cfg, self.mesh)


class LlamaForCausalLM(nn.Module):
    """Llama causal LM with a residual method. `apply({"params": p}, input_ids [b, s])` -> float32
    logits [b, s, v]. Pass `inputs_embeds` [b, s, h] instead of ids to differentiate w.r.t. them.

    With a mesh, the activations (embeddings, attention in/out, MLP hidden, logits) and the
    layer scan's carry are constrained to their logical axes (sharding.py), and where the mesh
    splits the vocabulary the embedding is vocabulary-parallel (`ParallelVocabEmbedding`:
    shard_map lookup-and-zero + psum). Without one (None) nothing is constrained. The mesh may
    have Auto or Explicit axes (plain `jax.make_mesh`); inside `jax.set_mesh` of an Explicit
    mesh the layers run with Auto axes (`sharding.with_auto_axes`) and `init` must happen
    outside it.

    Decoding: `apply({"params": p}, ids [b, n], cache=cache)` with a cache from `empty_cache`
    runs the n tokens at positions cache["length"] + [0, n) against the cached ones and returns
    (logits [b, n, v], the extended cache): the logits equal those of the full sequence.
    """

    config: ModelConfig
    mesh: Mesh | None = None

    def setup(self):
        cfg = self.config
        if self.mesh is not None and sharding.mesh_ways(self.mesh, "vocab") > 1:
            self.embed_tokens = ParallelVocabEmbedding(
                cfg.vocab_size, cfg.hidden_size, self.mesh, axis_name=sharding.TENSOR_AXIS,
                init_std=cfg.initializer_range, init_base_seed=None, batch_axes=sharding.BATCH_AXES,
            )
        else:
            self.embed_tokens = VocabEmbedding(cfg.vocab_size, cfg.hidden_size,
                                               init_std=cfg.initializer_range, init_seed=None)
        self.layers = DecoderStack(cfg, self.mesh)
        self.norm = GroupRMSNorm(cfg.hidden_size, cfg.hidden_size, eps=cfg.rms_norm_eps,
                                 init_range=(1.0, 1.0), init_seed=None)
        if not cfg.tie_word_embeddings:
            self.lm_head = self.param(
                "lm_head",
                nn.with_logical_partitioning(nn.initializers.normal(cfg.initializer_range), ("embed", "vocab")),
                (cfg.hidden_size, cfg.vocab_size), jnp.float32,
            )

    def __call__(self, input_ids, inputs_embeds=None, cache: State | None = None):
        if self.is_initializing() and explicit_mesh_context():
            raise ValueError("LlamaForCausalLM.init cannot run inside `jax.set_mesh(mesh)` of a mesh with Explicit axes: "
                             "initialise outside it (the model takes its mesh as `mesh=`), then apply inside or outside")
        if cache is not None:  # decoding: the batch layout of the cache is the caller's
            return self._logits(input_ids, inputs_embeds, cache)
        return with_auto_axes(self._logits, input_ids, inputs_embeds, cache)

    def _logits(self, input_ids, inputs_embeds, cache):
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if x.ndim != 3:
            raise ValueError(f"expected input_ids [b, s] or inputs_embeds [b, s, h], got embeddings of shape {x.shape}")
        x = sharding.constrain(x, ("batch", "seq", "embed"), self.mesh)
        seq_len = x.shape[1]
        if cache is None:
            positions, ratio = jnp.arange(seq_len), rope_ratio_for(seq_len, cfg)
        else:
            cache_len = cache["cache_k"].shape[2]
            if seq_len > cache_len:
                raise ValueError(f"{seq_len} new tokens do not fit a decoding cache of {cache_len} positions")
            positions, ratio = cache["length"] + jnp.arange(seq_len), rope_ratio_for(cache_len, cfg)
        cos, sin = F.rope_tables(cfg.head_dim, positions, cfg.rope_theta, ratio)
        x = self.layers(x.astype(dtype), cos, sin, cache)
        x, cache = (x, None) if cache is None else x
        x = self.norm(x)
        if cfg.tie_word_embeddings:
            head = nn.meta.unbox(self.embed_tokens.variables["params"]["embedding"]).T
        else:
            head = self.lm_head
        logits = F.einsum_f32("bsh,hv->bsv", x, head.astype(dtype))
        logits = sharding.constrain(logits, ("batch", "seq", "vocab"), self.mesh)
        return logits if cache is None else (logits, cache)
