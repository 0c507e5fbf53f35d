"""The residual-method Llama decoder: one `lax.scan` over layers (SPEC.md Part B).

The scan carry holds the hidden state X_l and, for the methods that look back, the post-RoPE
Q and K of every layer so far (`StoredAttention`, fixed [L, ...] buffers filled as the scan
advances). Layer i's attention probabilities are never stored: P_i = softmax(Q_i K_i^T / sqrt(hd)
+ mask) is recomputed from them, so the state is O(L b s h), linear in sequence length.

Per layer l (see residual.py for the rules that differ between methods):
    a_l = Attn_l(N1_l(X_l))                 scores sum_i sigma_{l,i} Q_i K_i^T (method 5)
    H_l = R_attn + a_l                      R_attn = X_l, or sum_{i<l} w_{l,i} A~_i(X_l)
    X_{l+1} = R_mlp + MLP_l(N2_l(H_l))      R_mlp = H_l, or sum_{i<l} w_{l,i} M~_i(X_l)
"""

from __future__ import annotations

import functools
import typing

import jax
import jax.numpy as jnp
from flax import linen as nn

from jax_residual import functional as F
from jax_residual.config import ModelConfig
from jax_residual.embedding import ParallelVocabEmbedding, VocabEmbedding
from jax_residual.norm import GroupRMSNorm
from jax_residual.residual import (
    METHOD_PARAM_NAMES,
    ResidualMethod,
    get_method,
    rerun_layers,
    standard_scales,
)


class StoredAttention(typing.NamedTuple):
    """Post-RoPE queries [L, b, s, nh, hd] and keys [L, b, s, nkv, hd] of every layer."""

    q: jax.Array
    k: jax.Array

    def write(self, layer, q, k) -> StoredAttention:
        return StoredAttention(self.q.at[layer].set(q), self.k.at[layer].set(k))


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
    for name, initial_value in get_method(cfg.residual_method).params.items():
        value = initial_value(L)
        specs[name] = (value.shape, ("layers", "earlier_layers"), lambda key, shape, dtype, v=value: jnp.asarray(v, dtype))
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


def accumulated_score_attention(stored: StoredAttention, v, scales, cfg: ModelConfig):
    """softmax(sum_i scales_i Q_i K_i^T + mask) V for stored Q/K [L, b, s, n, hd], v [b, s, nkv, hd].

    The weighted score sum is ONE contraction over (layer, head dim): the dot product of the
    concatenations [scales_0 Q_0, ..., scales_L Q_L] and [K_0, ..., K_L] (SPEC B4). Returns
    [b, s, nh, hd]. The float32 scales multiply the queries in float32 (one rounding to the
    compute dtype); the score sum accumulates in float32.
    """
    L, b, s, nh, hd = stored.q.shape
    q = (stored.q.astype(jnp.float32) * scales[:, None, None, None, None]).astype(stored.q.dtype)
    q_cat = jnp.moveaxis(q, 0, -2).reshape(b, s, nh, L * hd)
    k_cat = jnp.moveaxis(stored.k, 0, -2).reshape(b, s, stored.k.shape[-2], L * hd)
    return F.causal_attention(q_cat, k_cat, v, 1.0, cfg.attention_block_size)


def recompute_chunk(x, x_hat, q, k, p, w, output: str, cfg: ModelConfig):
    """sum_c w_c A~_c(x) (output="attention") or sum_c w_c M~_c(x) (output="mlp") over a chunk of
    C earlier layers: stored q [C, b, s, nh, hd], k [C, b, s, nkv, hd], layer params p stacked
    [C, ...], weights w [C]; x [b, s, h] and its shared normalisation x_hat.

    A~_c(x) = heads(P_c . (N1_c(x) Wv_c)) Wo_c,  M~_c(x) = MLP_c(N2_c(x + A~_c(x))).
    N1_c(x) = x_hat * gamma_c, so gamma_c is folded into Wv_c: one matmul gives every value, and
    one attention call covers the chunk. The attention output sum is one contraction over
    (layer, head dims). The MLP re-runs are C 2-D matmul chains on the flattened tokens: XLA:CPU
    runs the backward of a batched [C, t, i] weight gradient through an unvectorised transposing
    copy (measured: a method1 train step ~17% slower batched).
    The weights w stay float32 and so does the weighted sum (returned float32 [b, s, h]).
    """
    C, b, s = q.shape[:3]
    dtype = x.dtype
    v = jnp.einsum("bsh,chk->cbsk", x_hat.astype(dtype), p["input_layernorm"][:, :, None] * p["v_proj"])
    heads = F.causal_attention(q, k, v.reshape(C, b, s, cfg.num_key_value_heads, cfg.head_dim),
                               F.default_attention_scale(cfg.head_dim), cfg.attention_block_size).reshape(C, b * s, -1)
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


def recompute_earlier(x, stored: StoredAttention, layers, rerun, weights, output: str, cfg: ModelConfig):
    """sum_i w_i A~_i(x) or w_i M~_i(x) over the re-run layers i (`rerun` [L] boolean, weights
    [L] zero elsewhere), in chunks of C layers.

    The candidates are layers 0, p, 2p, ... (p = `rerun_every`, default 1: all), sliced
    statically; an inner scan walks them C at a time, and `lax.cond` skips a chunk that holds
    no re-run layer (at or after the current layer, or before the `rerun_window`). So layer l
    runs ceil(l/C) chunks (at most C-1 wasted layers; none at the default C = 1) and the HLO
    holds one chunk body whatever L is. The sum accumulates in float32; returns x.dtype.
    """
    x_hat = F.rms_normalize(x, cfg.hidden_size, cfg.rms_norm_eps)
    compute = recompute_chunk
    if cfg.remat in ("recompute", "layer"):
        compute = jax.checkpoint(recompute_chunk, static_argnums=(6, 7))

    def chunks(a):
        candidates = a[::cfg.rerun_every]
        return candidates.reshape(-1, cfg.recompute_chunk_size, *candidates.shape[1:])

    def step(total, xs):
        rerun, q, k, p, w = xs
        contribution = jax.lax.cond(
            jnp.any(rerun),
            lambda: compute(x, x_hat, q, k, p, w, output, cfg),
            lambda: jnp.zeros(x.shape, jnp.float32),
        )
        return total + contribution, None

    recompute_params = {name: layers[name] for name in RECOMPUTE_PARAM_NAMES}
    xs = jax.tree.map(chunks, (rerun, stored.q, stored.k, recompute_params, weights))
    total, _ = jax.lax.scan(step, jnp.zeros(x.shape, jnp.float32), xs)
    return total.astype(x.dtype)


RECOMPUTE_PARAM_NAMES = ("input_layernorm", "v_proj", "o_proj", "post_attention_layernorm",
                         "gate_proj", "up_proj", "down_proj")


def decoder_layer(x, stored: StoredAttention | None, layer, p, layers, cos, sin,
                  cfg: ModelConfig, method: ResidualMethod):
    """One layer l of SPEC B0/B2. x [b, s, h]; p: this layer's params; layers: all layers'
    params stacked [L, ...] (for re-running earlier layers). Returns (X_{l+1}, stored)."""
    b, s, _ = x.shape
    L, norm_eps, hidden = cfg.num_hidden_layers, cfg.rms_norm_eps, cfg.hidden_size
    first = layer == 0  # layer 0 attends like the standard layer

    q, k, v = project_qkv(F.group_rms_norm(x, p["input_layernorm"], hidden, norm_eps), p, cos, sin, cfg)
    if stored is not None:
        stored = stored.write(layer, q, k)
    if method.score_scales is not None:
        scales = jnp.where(first, standard_scales(layer, p, L, cfg.head_dim),
                           method.score_scales(layer, p, L, cfg.head_dim))
        heads = accumulated_score_attention(stored, v, scales, cfg)
    else:
        heads = F.causal_attention(q, k, v, F.default_attention_scale(cfg.head_dim), cfg.attention_block_size)
    attn_out = (heads.reshape(b * s, -1) @ p["o_proj"]).reshape(b, s, -1)

    def residual(output: str, standard):
        if method.recompute != output:
            return standard
        rerun = rerun_layers(layer, L, cfg.rerun_window, cfg.rerun_every)
        weights = method.earlier_weights(layer, rerun, p)
        return jnp.where(jnp.any(rerun), recompute_earlier(x, stored, layers, rerun, weights, output, cfg), standard)

    h = residual("attention", x) + attn_out
    mlp_out = F.swiglu(F.group_rms_norm(h, p["post_attention_layernorm"], hidden, norm_eps),
                       p["gate_proj"], p["up_proj"], p["down_proj"])
    return residual("mlp", h) + mlp_out, stored


def looks_back(method: ResidualMethod) -> bool:
    """Whether the method reads earlier layers' stored Q/K (everything but `standard`)."""
    return method.recompute is not None or method.score_scales is not None


def empty_stored_attention(x, cfg: ModelConfig) -> StoredAttention:
    L, (b, s, _) = cfg.num_hidden_layers, x.shape
    return StoredAttention(jnp.zeros((L, b, s, cfg.num_attention_heads, cfg.head_dim), x.dtype),
                           jnp.zeros((L, b, s, cfg.num_key_value_heads, cfg.head_dim), x.dtype))


def decoder_stack(x, layers, cos, sin, cfg: ModelConfig):
    """All L layers as one scan. x [b, s, h]; layers: params stacked [L, ...]. Returns [b, s, h]."""
    method = get_method(cfg.residual_method)
    if looks_back(method) and cfg.remat == "layer":
        return looking_back_stack(x, layers, cos, sin, cfg)
    stored = empty_stored_attention(x, cfg) if looks_back(method) else None

    def body(carry, xs):
        layer, p = xs
        return decoder_layer(*carry, layer, p, layers, cos, sin, cfg, method), None

    if cfg.remat == "layer":
        body = jax.checkpoint(body)
    (x, _), _ = jax.lax.scan(body, (x, stored), (jnp.arange(cfg.num_hidden_layers), layers))
    return x


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def looking_back_stack(x, layers, cos, sin, cfg: ModelConfig):
    """`decoder_stack` of a method that reads stored Q/K, with layer rematerialisation that
    saves only each layer's input X_l and the final stored Q/K (memory O(L b s (h + n hd))).

    Differentiating the plain scan would save the whole stored-Q/K carry at every layer
    (O(L^2 b s n hd)). Here the backward scan re-runs layer l from X_l against the *final*
    stored Q/K: slots < l hold the values layer l read in the forward pass, slot l is rewritten
    by the layer itself, and slots > l enter with weight 0 (w_{l,i} = 0, sigma_{l,i} = 0), so
    the function, and its gradient, are those of the forward pass.
    """
    return _looking_back_forward(x, layers, cos, sin, cfg)[0]


def _looking_back_forward(x, layers, cos, sin, cfg: ModelConfig):
    method = get_method(cfg.residual_method)

    def body(carry, xs):
        layer, p = xs
        return decoder_layer(*carry, layer, p, layers, cos, sin, cfg, method), carry[0]

    (x_out, stored), inputs = jax.lax.scan(body, (x, empty_stored_attention(x, cfg)),
                                           (jnp.arange(cfg.num_hidden_layers), layers))
    return x_out, (inputs, stored, layers, cos, sin)


def _looking_back_backward(cfg: ModelConfig, residuals, d_out):
    inputs, stored, layers, cos, sin = residuals
    method = get_method(cfg.residual_method)

    def body(carry, xs):
        d_x, d_stored, d_layers, d_cos, d_sin = carry
        layer, x, p = xs
        layer_fn = lambda x, stored, p, layers, cos, sin: decoder_layer(x, stored, layer, p, layers, cos, sin, cfg, method)
        _, vjp = jax.vjp(layer_fn, x, stored, p, layers, cos, sin)
        d_x, d_stored, d_p, d_layers_l, d_cos_l, d_sin_l = vjp((d_x, d_stored))
        add = lambda a, b: jax.tree.map(jnp.add, a, b)
        return (d_x, d_stored, add(d_layers, d_layers_l), d_cos + d_cos_l, d_sin + d_sin_l), d_p

    zeros = lambda tree: jax.tree.map(jnp.zeros_like, tree)
    carry = (d_out, zeros(stored), zeros(layers), zeros(cos), zeros(sin))
    (d_x, _, d_layers, d_cos, d_sin), d_p = jax.lax.scan(
        body, carry, (jnp.arange(cfg.num_hidden_layers), inputs, layers), reverse=True)
    return d_x, jax.tree.map(jnp.add, d_layers, d_p), d_cos, d_sin


looking_back_stack.defvjp(_looking_back_forward, _looking_back_backward)


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
        layers = {name: value if name in METHOD_PARAM_NAMES else value.astype(x.dtype)
                  for name, value in layers.items()}
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
        return F.einsum_f32("bsh,hv->bsv", x, head.astype(dtype))
