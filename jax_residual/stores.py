"""What a layer keeps of its attention for the later layers: one small class per store.

A scheme that reads earlier layers' attention (methods 1-5: `Connection.stores_attention`) gets,
by `ModelConfig.attention_state` (resolved to "qk" or "probs"), one of

    StoredQK      "qk": post-RoPE queries stored_q [L, b, s, nh, hd] and keys stored_k
                  [L, b, s, nkv, hd]; P_i = softmax(Q_i K_i^T / sqrt(hd) + mask) and S_i are
                  recomputed from them (docs/maths.md B4). O(L b s h): linear in s.
    StoredProbs   "probs", methods 1-4: P_i itself, stored_probs [L, b, nh, s, s] (a re-run is
                  one P_i V product).
    ScoreSum      "probs", 5.1-5.4: the running raw-score sum score_sum = sum_{i<=l} S_i
                  [b, nh, s, s] float32 (one layer's worth, accumulated: not written once).
    StoredScores  "probs", 5.5: every layer's raw scores stored_scores [L, b, nh, s, s] float32.

(the [L, ...] probability stacks are `final_only`: the stack keeps only the final carry), and
every other scheme `PlainAttention` (nothing kept). Decoding uses `DecodeCache` instead. Each
store declares its carry fields and answers the same four questions: write layer l's attention,
layer l's own attention, the summed-score attention of method 5, and a re-run of the earlier
layers (methods 1-4). Attention is causal over the sequence itself except in the cache.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jax_residual.connections.base import State, StateField
from jax_residual.connections.rerun import recompute_earlier, rerun_outputs, rerun_values
from jax_residual.functional import rms_normalize
from jax_residual.kernels import attention as A
from jax_residual.params import RERUN_PARAM_NAMES

SCORE_PREFIX_BUCKETS = 4


class PlainAttention:
    """Keeps nothing: each layer attends causally with its own Q, K, V."""

    def __init__(self, cfg):
        self.cfg = cfg

    def fields(self) -> dict[str, StateField]:
        return {}

    def write(self, state: State, layer, q, k, v) -> State:
        return state

    def attend(self, state: State, layer, q, k, v):
        """Layer l's own attention: q [b, s, nh, hd], k, v [b, s, nkv, hd] -> [b, s, nh, hd]."""
        return A.causal_attention(q, k, v, A.default_attention_scale(self.cfg.head_dim), self.cfg.attention_block_size)


class StoredQK(PlainAttention):
    """"qk": the post-RoPE Q and K of every layer."""

    def fields(self) -> dict[str, StateField]:
        c = self.cfg
        L, nh, nkv, hd = c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim
        return {
            "stored_q": StateField(lambda c, b, s: (L, b, s, nh, hd), ("layers", "batch", "seq", "heads", "head_dim")),
            "stored_k": StateField(lambda c, b, s: (L, b, s, nkv, hd), ("layers", "batch", "seq", "kv_heads", "head_dim")),
        }

    def write(self, state: State, layer, q, k, v) -> State:
        return {**state, "stored_q": state["stored_q"].at[layer].set(q), "stored_k": state["stored_k"].at[layer].set(k)}

    def attend_summed_scores(self, state: State, layer, v, scales):
        """softmax(sum_i scales_i Q_i K_i^T + mask) V for scales [L] zero for i > l, v [b, s, nkv, hd].

        The weighted score sum is ONE contraction over (layer, head dim): the dot product of the
        concatenations [scales_0 Q_0, ..., scales_n Q_n] and [K_0, ..., K_n] (docs/maths.md B4),
        over only a prefix of the stored layers: the shortest of SCORE_PREFIX_BUCKETS static
        prefixes ceil(j L / 4), j = 1..4, that holds layers 0..l (`lax.switch`: four attention
        calls in the HLO whatever L is), so layer l contracts about the layers it sums, not all
        L. The switch is checkpointed (differentiated inside the scan it would keep every
        branch's residuals). The float32 scales multiply the queries in float32 (one rounding to
        the compute dtype); the score sum accumulates in float32. Returns [b, s, nh, hd].
        """
        stored_q, stored_k = state["stored_q"], state["stored_k"]
        L, b, s, nh, hd = stored_q.shape
        lengths = [-(-j * L // SCORE_PREFIX_BUCKETS) for j in range(1, SCORE_PREFIX_BUCKETS + 1)]

        def prefix_attention(n):
            def attend(v):
                q = (stored_q[:n].astype(jnp.float32) * scales[:n, None, None, None, None]).astype(stored_q.dtype)
                q_cat = jnp.moveaxis(q, 0, -2).reshape(b, s, nh, n * hd)
                k_cat = jnp.moveaxis(stored_k[:n], 0, -2).reshape(b, s, stored_k.shape[-2], n * hd)
                return A.causal_attention(q_cat, k_cat, v, 1.0, self.cfg.attention_block_size)

            return attend

        shortest = jnp.sum(jnp.asarray(lengths) <= layer)  # the first prefix with length > l
        return jax.checkpoint(lambda v: jax.lax.switch(shortest, [prefix_attention(n) for n in lengths], v))(v)

    def _rerun_heads(self, attention: tuple, v):
        """P_c V of a chunk's stored (q, k) [C, b, s, n, hd] and new values v [C, b, s, nkv, hd]."""
        q, k = attention
        return A.causal_attention(q, k, v, A.default_attention_scale(self.cfg.head_dim), self.cfg.attention_block_size)

    def rerun(self, x, state: State, layers, layer, rerun, weights, output: str):
        """(sum_i w_i A~_i(x) or w_i M~_i(x) over the re-run layers, state); with remat
        "recompute"/"layer" a chunk's activations are recomputed in the backward pass."""
        checkpoint = self.cfg.remat in ("recompute", "layer")
        return recompute_earlier(x, (state["stored_q"], state["stored_k"]), self._rerun_heads, layers, rerun, weights,
                                 output, self.cfg, checkpoint), state


def _per_layer_scores(cfg, dtype: str, **kind) -> StateField:
    """[L, b, nh, s, s] (kv_seq: no sharding rule, replicated), written once and kept final-only."""
    return StateField(lambda c, b, s: (cfg.num_hidden_layers, b, cfg.num_attention_heads, s, s),
                      ("layers", "batch", "heads", "seq", "kv_seq"), dtype=dtype, **kind)


class StoredProbs(PlainAttention):
    """"probs", methods 1-4: each layer's P_i (the model's dtype)."""

    def fields(self) -> dict[str, StateField]:
        return {"stored_probs": _per_layer_scores(self.cfg, "compute", final_only=True)}

    def write(self, state: State, layer, q, k, v) -> State:
        probs = A.causal_softmax(A.grouped_scores(q, k) * A.default_attention_scale(self.cfg.head_dim))
        return {**state, "stored_probs": state["stored_probs"].at[layer].set(probs.astype(v.dtype))}

    def attend(self, state: State, layer, q, k, v):
        return A.probs_attention(state["stored_probs"][layer], v)

    def rerun(self, x, state: State, layers, layer, rerun, weights, output: str):
        """As StoredQK.rerun with one P_i V product per re-run layer. The stack is already the
        `stateful_stack` (the state is `final_only`), which differentiates one layer at a time:
        the chunk keeps its activations for that layer's backward, so P_i V is not run a third
        time."""
        heads_of = lambda attention, v: A.probs_attention(attention[0], v)
        return recompute_earlier(x, (state["stored_probs"],), heads_of, layers, rerun, weights, output, self.cfg,
                                 False), state


class ScoreSum(PlainAttention):
    """"probs", 5.1-5.4 (uniform scales): the running raw-score sum sum_{i<=l} S_i."""

    def fields(self) -> dict[str, StateField]:
        nh = self.cfg.num_attention_heads
        return {"score_sum": StateField(lambda c, b, s: (b, nh, s, s), ("batch", "heads", "seq", "kv_seq"),
                                        dtype="float32", written_once=False)}

    def write(self, state: State, layer, q, k, v) -> State:
        return {**state, "score_sum": state["score_sum"] + A.grouped_scores(q, k)}

    def attend_summed_scores(self, state: State, layer, v, scales):
        """Uniform scales: sigma_l * sum_{i<=l} S_i."""
        return A.probs_attention(A.causal_softmax(state["score_sum"] * scales[layer]), v)


class StoredScores(PlainAttention):
    """"probs", 5.5: every layer's raw scores S_i (float32)."""

    def fields(self) -> dict[str, StateField]:
        return {"stored_scores": _per_layer_scores(self.cfg, "float32", final_only=True)}

    def write(self, state: State, layer, q, k, v) -> State:
        return {**state, "stored_scores": state["stored_scores"].at[layer].set(A.grouped_scores(q, k))}

    def attend_summed_scores(self, state: State, layer, v, scales):
        return A.probs_attention(A.causal_softmax(jnp.einsum("l,l...->...", scales, state["stored_scores"])), v)


PROBS_STORES = {"probs": StoredProbs, "score_sum": ScoreSum, "scores": StoredScores}


def attention_store(cfg, scheme) -> PlainAttention:
    """The store of a full-sequence pass: PlainAttention for a scheme that reads no earlier
    attention, else by the (resolved) attention_state."""
    if not scheme.stores_attention:
        return PlainAttention(cfg)
    if cfg.attention_state == "qk":
        return StoredQK(cfg)
    if cfg.attention_state != "probs":
        raise ValueError(f"attention_state {cfg.attention_state!r} is not resolved; use ModelConfig.with_attention_state")
    return PROBS_STORES[scheme.probs_state](cfg)


class DecodeCache:
    """What a layer keeps for later layers and later tokens when decoding: the tokens at
    positions [t, t + n) of a sequence whose earlier positions are cached (causality makes
    them final). Cache fields ([L, ...] per layer, T = the cache's length):

      cache_k, cache_v [L, b, T, nkv, hd]   post-RoPE keys and the values of every layer
      + the scheme's `cache_fields` (methods 1-4: rerun_v, the re-run values of each pair)
    and per step `step_q` [L, b, n, nh, hd], every layer's queries of the new tokens (methods
    1-5: P_i's rows of the new tokens are softmax(q_i K_i^T) over the cached keys). Method 5
    reads the cached keys of every layer. Re-runs run over all L earlier layers with weight 0
    beyond the re-run ones (decoding is not where that costs).
    """

    def __init__(self, cfg, start):
        self.cfg, self.start = cfg, start

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
        return A.attention_at_positions(q, k, v, scale, self.positions(q.shape[-3]))

    def attend(self, state: State, layer, q, k, v):
        return self._attend(q, state["cache_k"][layer], state["cache_v"][layer],
                            A.default_attention_scale(self.cfg.head_dim))

    def attend_summed_scores(self, state: State, layer, v, scales):
        q, k = state["step_q"], state["cache_k"]
        L, b, n, nh, hd = q.shape
        q_cat = jnp.moveaxis(q * scales.astype(q.dtype)[:, None, None, None, None], 0, -2).reshape(b, n, nh, L * hd)
        k_cat = jnp.moveaxis(k, 0, -2).reshape(b, k.shape[2], k.shape[-2], L * hd)
        return self._attend(q_cat, k_cat, state["cache_v"][layer], 1.0)

    def rerun(self, x, state: State, layers, layer, rerun, weights, output: str):
        p = {name: layers[name] for name in RERUN_PARAM_NAMES}
        v_new = rerun_values(rms_normalize(x, self.cfg.hidden_size, self.cfg.rms_norm_eps).astype(x.dtype), p, self.cfg)
        rerun_v = state["rerun_v"].at[layer].set(
            jax.lax.dynamic_update_slice_in_dim(state["rerun_v"][layer], v_new, self.start, 2))
        heads = self._attend(state["step_q"], state["cache_k"], rerun_v[layer], A.default_attention_scale(self.cfg.head_dim))
        return rerun_outputs(x, heads, p, weights, output, self.cfg).astype(x.dtype), {**state, "rerun_v": rerun_v}


def empty_cache(cfg, batch: int, length: int, dtype=jnp.float32) -> State:
    """A decoding cache for `batch` sequences of up to `length` tokens (see `DecodeCache`), and
    "length": int32 [] the number of positions filled."""
    L, nkv, hd = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
    cache = {"length": jnp.zeros((), jnp.int32),
             "cache_k": jnp.zeros((L, batch, length, nkv, hd), dtype),
             "cache_v": jnp.zeros((L, batch, length, nkv, hd), dtype)}
    return cache | cfg.scheme.cache_fields(cfg, batch, length, dtype)
