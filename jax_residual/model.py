"""The residual-method Llama decoder: one `lax.scan` over layers (SPEC.md Part B, Part C).

The scan carry is (X_l, state): the residual stream X_l [b, s, h] ([n, b, s, h] for a method
with `streams`) and the fields the method declares (`ResidualMethod.state_fields`), e.g. what
the methods that look back keep of every layer's attention so far (fixed [L, ...] buffers
filled as the scan advances), chosen by `attention_state` from the shapes when traced: the
post-RoPE Q and K ("qk": P_i = softmax(Q_i K_i^T / sqrt(hd) + mask) is recomputed from them,
O(L b s h), linear in sequence length), or torch_ref's probabilities / raw scores ("probs":
O(L b nh s^2), a re-run is one P_i V product).

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

from jax_residual import functional as F
from jax_residual import sharding
from jax_residual.config import ModelConfig
from jax_residual.embedding import ParallelVocabEmbedding, VocabEmbedding
from jax_residual.norm import GroupRMSNorm
from jax_residual.residual import ResidualMethod, get_method, rerun_layers, standard_scales

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
    for name, weight in get_method(cfg.residual_method).weights.items():
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


def stored_attention(state: State, layer, q, k, v, scales, cfg: ModelConfig):
    """Layer l's attention heads [b, s, nh, hd] for a method that keeps its attention for the
    later layers, and the state with layer l's part written (`residual.stored_attention_fields`).

    q [b, s, nh, hd], k, v [b, s, nkv, hd] (post-RoPE); scales: [L] the score weights
    sigma_{l,.} of method 5 (zero for i > l), or None: layer l's own attention.
    "qk" writes Q_l, K_l and runs flash-style attention (method 5: `accumulated_score_attention`).
    "probs" forms the [b, nh, s, s] scores S_l once: methods 1-4 write P_l and use it; method 5
    adds S_l to the running sum (uniform scales: logits = sigma_l * sum_{i<=l} S_i) or writes it
    and weights the stack (logits = sum_i sigma_i S_i, elementwise over L [s, s] slices).
    """
    if cfg.attention_state == "qk":
        state = {**state, "stored_q": state["stored_q"].at[layer].set(q), "stored_k": state["stored_k"].at[layer].set(k)}
        if scales is None:
            return F.causal_attention(q, k, v, F.default_attention_scale(cfg.head_dim), cfg.attention_block_size), state
        return accumulated_score_attention(state, layer, v, scales, cfg), state
    scores = F.grouped_scores(q, k)
    if scales is None:
        probs = F.causal_softmax(scores * F.default_attention_scale(cfg.head_dim))
        state = {**state, "stored_probs": state["stored_probs"].at[layer].set(probs.astype(v.dtype))}
    elif "score_sum" in state:
        state = {**state, "score_sum": state["score_sum"] + scores}
        probs = F.causal_softmax(state["score_sum"] * scales[layer])
    else:
        state = {**state, "stored_scores": state["stored_scores"].at[layer].set(scores)}
        probs = F.causal_softmax(jnp.einsum("l,l...->...", scales, state["stored_scores"]))
    return F.probs_attention(probs, v), state


def accumulated_score_attention(state: State, layer, v, scales, cfg: ModelConfig):
    """softmax(sum_i scales_i Q_i K_i^T + mask) V for the stored Q/K of `state`
    ([L, b, s, n, hd]), scales [L] zero for i > l, and v [b, s, nkv, hd]. Returns [b, s, nh, hd].

    The weighted score sum is ONE contraction over (layer, head dim): the dot product of the
    concatenations [scales_0 Q_0, ..., scales_n Q_n] and [K_0, ..., K_n] (SPEC B4), over only
    a prefix of the stored layers: the shortest of SCORE_PREFIX_BUCKETS static prefixes
    ceil(j L / 4), j = 1..4, that holds layers 0..l (`lax.switch`: four attention calls in the
    HLO whatever L is). At L = 8 a layer contracts 5 layers on average, not 8 (4.5 needed).
    The switch is checkpointed: differentiated in the scan it would save every branch's
    residuals at every layer (method5.5 b8 s256: 1378 vs 806 MiB temp without buckets; with
    the checkpoint 774 MiB and 0.97x the time, benchmarks/README.md).
    """
    stored_q, stored_k = state["stored_q"], state["stored_k"]
    L, b, s, nh, hd = stored_q.shape
    lengths = [-(-j * L // SCORE_PREFIX_BUCKETS) for j in range(1, SCORE_PREFIX_BUCKETS + 1)]

    def prefix_attention(n):
        def attend(v):
            q = stored_q[:n] * scales[:n].astype(stored_q.dtype)[:, None, None, None, None]
            q_cat = jnp.moveaxis(q, 0, -2).reshape(b, s, nh, n * hd)
            k_cat = jnp.moveaxis(stored_k[:n], 0, -2).reshape(b, s, stored_k.shape[-2], n * hd)
            return F.causal_attention(q_cat, k_cat, v, 1.0, cfg.attention_block_size)

        return attend

    shortest = jnp.sum(jnp.asarray(lengths) <= layer)  # the first prefix with length > l
    return jax.checkpoint(lambda v: jax.lax.switch(shortest, [prefix_attention(n) for n in lengths], v))(v)


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
    """sum_c w_c A~_c(x) (output="attention") or sum_c w_c M~_c(x) (output="mlp") over a chunk of
    C earlier layers: their stored attention (`rerun_heads`), layer params p stacked [C, ...],
    weights w [C]; x [b, s, h] and its shared normalisation x_hat.

    A~_c(x) = heads(P_c . (N1_c(x) Wv_c)) Wo_c,  M~_c(x) = MLP_c(N2_c(x + A~_c(x))).
    N1_c(x) = x_hat * gamma_c, so gamma_c is folded into Wv_c: one matmul gives every value, and
    one attention call covers the chunk. The attention output sum is one contraction over
    (layer, head dims). The MLP re-runs are C 2-D matmul chains on the flattened tokens: XLA:CPU
    runs the backward of a batched [C, t, i] weight gradient through an unvectorised transposing
    copy (measured: a method1 train step ~17% slower batched).
    """
    (C,), (b, s) = w.shape, x.shape[:2]
    dtype = x.dtype
    w = w.astype(dtype)
    v = jnp.einsum("bsh,chk->cbsk", x_hat.astype(dtype), p["input_layernorm"][:, :, None] * p["v_proj"])
    heads = rerun_heads(attention, v.reshape(C, b, s, cfg.num_key_value_heads, cfg.head_dim), cfg).reshape(C, b * s, -1)
    if output == "attention":
        return jnp.einsum("c,ctk,ckh->th", w, heads, p["o_proj"]).reshape(x.shape)
    tokens = x.reshape(b * s, -1)

    def rerun_mlp(c):
        h = tokens + heads[c] @ p["o_proj"][c]
        h_hat = F.rms_normalize(h, cfg.hidden_size, cfg.rms_norm_eps).astype(dtype)
        gamma = p["post_attention_layernorm"][c][:, None]
        return F.swiglu(h_hat, gamma * p["gate_proj"][c], gamma * p["up_proj"][c], p["down_proj"][c])

    return sum(w[c] * rerun_mlp(c) for c in range(C)).reshape(x.shape)


def recompute_earlier(x, state: State, layers, rerun, weights, output: str, cfg: ModelConfig):
    """sum_i w_i A~_i(x) or w_i M~_i(x) over the re-run layers i (`rerun` [L] boolean, weights
    [L] zero elsewhere), in chunks of C layers.

    The candidates are layers 0, p, 2p, ... (p = `rerun_every`, default 1: all), sliced
    statically; an inner scan walks them C at a time, and `lax.cond` skips a chunk that holds
    no re-run layer (at or after the current layer, or before the `rerun_window`). So layer l
    runs ceil(l/C) chunks (at most C-1 wasted layers; none at the default C = 1) and the HLO
    holds one chunk body whatever L is.

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
            lambda: jnp.zeros_like(x),
        )
        return total + contribution, None

    recompute_params = {name: layers[name] for name in RECOMPUTE_PARAM_NAMES}
    xs = jax.tree.map(chunks, (rerun, stored_for_rerun(state, cfg), recompute_params, weights))
    total, _ = jax.lax.scan(step, jnp.zeros_like(x), xs)
    return total


RECOMPUTE_PARAM_NAMES = ("input_layernorm", "v_proj", "o_proj", "post_attention_layernorm",
                         "gate_proj", "up_proj", "down_proj")


def decoder_layer(x, state: State, layer, p, layers, cos, sin, cfg: ModelConfig, method: ResidualMethod):
    """One layer l of SPEC B0/B2 (and Part C). x: the residual stream X_l [b, s, h] ([n, b, s, h]
    with `method.streams`); state: the method's carry fields; p: this layer's params; layers:
    all layers' params stacked [L, ...] (for re-running earlier layers). Returns (X_{l+1}, state)."""
    L, norm_eps, hidden = cfg.num_hidden_layers, cfg.rms_norm_eps, cfg.hidden_size
    first = layer == 0  # layer 0 attends and connects like the standard layer
    layer_input = x

    def attention(y, state):
        b, s, _ = y.shape
        q, k, v = project_qkv(F.group_rms_norm(y, p["input_layernorm"], hidden, norm_eps), p, cos, sin, cfg)
        if method.mix_values is not None:
            state = {**state, "first_values": jnp.where(first, v, state["first_values"])}
            v = jnp.where(first, v, method.mix_values(v, state["first_values"], p))
        if method.stores_attention:
            scales = None if method.score_scales is None else jnp.where(
                first, standard_scales(layer, p, L, cfg.head_dim), method.score_scales(layer, p, L, cfg.head_dim))
            heads, state = stored_attention(state, layer, q, k, v, scales, cfg)
        else:
            heads = F.causal_attention(q, k, v, F.default_attention_scale(cfg.head_dim), cfg.attention_block_size)
        return (heads.reshape(b * s, -1) @ p["o_proj"]).reshape(b, s, -1), state

    def mlp(y):
        return F.swiglu(F.group_rms_norm(y, p["post_attention_layernorm"], hidden, norm_eps),
                        p["gate_proj"], p["up_proj"], p["down_proj"])

    def connect(sublayer: str, stream, state):
        """(the sub-layer's input, write(out) -> the stream after it)."""
        if method.streams is not None:
            return method.streams.connect(stream, sublayer, p, cfg)
        if method.recompute != sublayer:
            return stream, lambda out: stream + out
        rerun = rerun_layers(layer, L, cfg.rerun_window, cfg.rerun_every)
        weights = method.earlier_weights(layer, rerun, p)
        residual = jnp.where(jnp.any(rerun),
                             recompute_earlier(layer_input, state, layers, rerun, weights, sublayer, cfg), stream)
        return stream, lambda out: residual + out

    y, write = connect("attention", x, state)
    attn_out, state = attention(y, state)
    h = write(attn_out)
    y, write = connect("mlp", h, state)
    x = write(mlp(y))
    if method.mix_blocks is not None:
        blocks = state["block_outputs"].at[layer + 1].set(x)
        alpha = method.mix_blocks(layer, p, L).astype(x.dtype)
        x, state = jnp.einsum("j,j...->...", alpha, blocks), {**state, "block_outputs": blocks}
    return x, state


def initial_state(x, cfg: ModelConfig, method: ResidualMethod) -> State:
    """The method's carry fields before layer 0, from the embeddings x [b, s, h], each
    constrained to its logical axes (sharding.py)."""
    b, s, _ = x.shape
    state = {}
    for name, field in method.state_fields(cfg).items():
        zeros = jnp.zeros(field.shape(cfg, b, s), x.dtype if field.dtype == "compute" else jnp.float32)
        value = zeros if field.initial is None else field.initial(x.astype(zeros.dtype), zeros)
        state[name] = sharding.constrain(value, field.axes)
    return state


def decoder_stack(x, layers, cos, sin, cfg: ModelConfig):
    """All L layers as one scan. x [b, s, h]; layers: params stacked [L, ...]. Returns [b, s, h].

    `attention_state` "auto" is resolved here from x's batch and sequence length. The stack is
    the `stateful_stack` custom VJP (only the final state kept) when every state field is
    written once and remat="layer" asks for it or a field is `final_only`; otherwise the plain
    scan (its body checkpointed with remat="layer": an accumulated field, e.g. method 5's
    running score sum in "probs", is then saved at every layer, one layer's size each time).
    """
    cfg = cfg.with_attention_state(*x.shape[:2])
    method = get_method(cfg.residual_method)
    state = initial_state(x, cfg, method)
    fields = method.state_fields(cfg).values()
    stream = x if method.streams is None else jnp.broadcast_to(x, (method.streams.count(cfg), *x.shape))
    keep_final_only = cfg.remat == "layer" or any(field.final_only for field in fields)
    if state and keep_final_only and all(field.written_once for field in fields):
        stream = stateful_stack(stream, state, layers, cos, sin, cfg)
    else:
        def body(carry, xs):
            layer, p = xs
            return decoder_layer(*carry, layer, p, layers, cos, sin, cfg, method), None

        if cfg.remat == "layer":
            body = jax.checkpoint(body)
        (stream, _), _ = jax.lax.scan(body, (stream, state), (jnp.arange(cfg.num_hidden_layers), layers))
    return stream if method.streams is None else stream.sum(axis=0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def stateful_stack(x, state: State, layers, cos, sin, cfg: ModelConfig):
    """The layer scan of a method with carry state, with layer rematerialisation that saves
    only each layer's input X_l and the final state (memory O(L b s h) plus one state).

    Differentiating the plain scan would save the whole state at every layer (O(L^2 b s n hd)
    for stored Q/K). Here the backward scan re-runs layer l from X_l against the *final*
    state: every field is written once (`StateField.written_once`), so the slots layer l reads
    hold what it read in the forward pass, the slots it writes are rewritten by the layer
    itself, and slots written later enter with weight 0; the function, and its gradient, are
    those of the forward pass. Returns the last layer's stream.
    """
    return _stateful_forward(x, state, layers, cos, sin, cfg)[0]


def _stateful_forward(x, state: State, layers, cos, sin, cfg: ModelConfig):
    method = get_method(cfg.residual_method)

    def body(carry, xs):
        layer, p = xs
        return decoder_layer(*carry, layer, p, layers, cos, sin, cfg, method), carry[0]

    (x_out, state), inputs = jax.lax.scan(body, (x, state), (jnp.arange(cfg.num_hidden_layers), layers))
    return x_out, (inputs, state, layers, cos, sin)


def _stateful_backward(cfg: ModelConfig, residuals, d_out):
    inputs, state, layers, cos, sin = residuals
    method = get_method(cfg.residual_method)

    def body(carry, xs):
        d_x, d_state, d_layers, d_cos, d_sin = carry
        layer, x, p = xs
        layer_fn = lambda x, state, p, layers, cos, sin: decoder_layer(x, state, layer, p, layers, cos, sin, cfg, method)
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

    @nn.compact
    def __call__(self, x, cos, sin):
        cfg = self.config
        layers = {
            name: self.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)
            for name, (shape, axes, init) in layer_param_specs(cfg).items()
        }
        weights = get_method(cfg.residual_method).weights  # connection weights stay float32
        layers = {name: value if name in weights else value.astype(x.dtype) for name, value in layers.items()}
        return decoder_stack(x, layers, cos, sin, cfg)


class LlamaForCausalLM(nn.Module):
    """Llama causal LM with a residual method. `apply({"params": p}, input_ids [b, s])` -> float32
    logits [b, s, v]. Pass `inputs_embeds` [b, s, h] instead of ids to differentiate w.r.t. them.

    With a mesh whose `tensor` axis has more than one device the embedding is vocabulary-parallel
    (`ParallelVocabEmbedding`: shard_map lookup-and-zero + psum).
    """

    config: ModelConfig
    mesh: jax.sharding.Mesh | None = None

    def setup(self):
        cfg = self.config
        if self.mesh is not None and self.mesh.shape.get("tensor", 1) > 1:
            self.embed_tokens = ParallelVocabEmbedding(
                cfg.vocab_size, cfg.hidden_size, self.mesh, axis_name="tensor",
                init_std=cfg.initializer_range, init_base_seed=None, batch_axes=("data", "fsdp"),
            )
        else:
            self.embed_tokens = VocabEmbedding(cfg.vocab_size, cfg.hidden_size,
                                               init_std=cfg.initializer_range, init_seed=None)
        self.layers = DecoderStack(cfg)
        self.norm = GroupRMSNorm(cfg.hidden_size, cfg.hidden_size, eps=cfg.rms_norm_eps,
                                 init_range=(1.0, 1.0), init_seed=None)
        if not cfg.tie_word_embeddings:
            self.lm_head = self.param(
                "lm_head",
                nn.with_logical_partitioning(nn.initializers.normal(cfg.initializer_range), ("embed", "vocab")),
                (cfg.hidden_size, cfg.vocab_size), jnp.float32,
            )

    def __call__(self, input_ids, inputs_embeds=None):
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if x.ndim != 3:
            raise ValueError(f"expected input_ids [b, s] or inputs_embeds [b, s, h], got embeddings of shape {x.shape}")
        seq_len = x.shape[1]
        cos, sin = F.rope_tables(cfg.head_dim, jnp.arange(seq_len), cfg.rope_theta, rope_ratio_for(seq_len, cfg))
        x = self.norm(self.layers(x.astype(dtype), cos, sin))
        if cfg.tie_word_embeddings:
            head = nn.meta.unbox(self.embed_tokens.variables["params"]["embedding"]).T
        else:
            head = self.lm_head
        return jnp.einsum("bsh,hv->bsv", x, head.astype(dtype), preferred_element_type=jnp.float32)
