"""Causal attention kernels: the one entry point `causal_attention` (cuDNN flash attention on
NVIDIA GPUs in bf16/fp16, this module's blocked custom-VJP flash kernel everywhere else), the
decoding form `attention_at_positions`, and the explicit [s, s] form of the "probs" attention
state (`grouped_scores`, `causal_softmax`, `probs_attention`).

Shapes as in functional.py: b batch, s sequence, nh query heads, nkv key/value heads, hd head dim.
One mask convention: boolean "may attend" (key u <= query t), applied to float32 scores.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np

from jax_residual.functional import einsum_f32

def causal_mask(seq_len: int):
    """Boolean [s, s]: query t may attend key u iff u <= t. The one mask convention used here."""
    return jnp.tril(jnp.ones((seq_len, seq_len), dtype=bool))


# cuDNN flash attention (through jax.nn.dot_product_attention) accepts head dims that are
# multiples of 8 up to this bound on every GPU architecture JAX supports (JAX's own check,
# `check_is_flash_attention`, allows 256 from compute capability 9.0, Hopper, on; 128 before).
CUDNN_MAX_HEAD_DIM = 128
CUDNN_HEAD_DIM_MULTIPLE = 8
CUDNN_DTYPES = ("bfloat16", "float16")
ATTENTION_IMPLEMENTATIONS = ("blocked", "cudnn")


def backend_platform() -> str:
    """The default backend's platform: "cpu", "tpu", "cuda" (NVIDIA GPU) or "rocm" (AMD GPU)."""
    backend = jax.default_backend()
    if backend != "gpu":
        return backend
    return "cuda" if "cuda" in jax.extend.backend.get_backend().platform_version.lower() else "rocm"


def attention_implementation(platform: str, dtype, q_head_dim: int, v_head_dim: int) -> str:
    """Which causal attention runs: "cudnn" or "blocked". A pure function of static facts.

    platform: as `backend_platform()` names it. "cudnn" (`jax.nn.dot_product_attention(
    implementation="cudnn")`, NVIDIA's fused flash kernel) needs "cuda", bf16/fp16 operands,
    one head dim for q, k and v (JAX's API takes v shaped like k: method 5's concatenated
    queries, q_head_dim = L*hd against v_head_dim = hd, do not fit for L > 1) and that head
    dim a multiple of CUDNN_HEAD_DIM_MULTIPLE up to CUDNN_MAX_HEAD_DIM. Everything else,
    float32 (so every parity test) and every CPU/TPU/ROCm run included, takes "blocked": this
    module's custom-VJP flash attention in query blocks. The sequence length imposes nothing:
    without an attention bias JAX's cuDNN check has no condition on it.
    """
    fits = (q_head_dim == v_head_dim and q_head_dim % CUDNN_HEAD_DIM_MULTIPLE == 0
            and q_head_dim <= CUDNN_MAX_HEAD_DIM)
    if platform == "cuda" and jnp.dtype(dtype).name in CUDNN_DTYPES and fits:
        return "cudnn"
    return "blocked"


def causal_attention(q, k, v, scale: float, block_size: int | None = None, implementation: str | None = None):
    """softmax(q k^T * scale + causal) v with grouped-query heads: the one attention entry point.

    q: [..., s, nh, dq], k: [..., s, nkv, dq], v: [..., s, nkv, dv] with nh % nkv == 0; query
    head j reads kv head j // (nh // nkv) (HF's repeat_kv order). Leading axes are batch-like
    (batch, or stored layers x batch). dq may differ from dv: method 5 contracts the
    concatenated queries of several layers. Scores, mask and softmax are float32; the mask
    is applied to scores, never to probabilities. Returns [..., s, nh, dv] in v.dtype.

    `implementation` None picks one with `attention_implementation` from the default backend's
    platform, q's dtype and the head dims; "blocked" or "cudnn" forces it. `block_size` applies
    to "blocked" only (see `blocked_attention`).
    """
    *lead, seq, heads, dq = q.shape
    kv_heads = k.shape[-2]
    if heads % kv_heads:
        raise ValueError(f"num query heads {heads} is not a multiple of num kv heads {kv_heads}")
    if implementation is None:
        implementation = attention_implementation(backend_platform(), q.dtype, dq, v.shape[-1])
    if implementation == "cudnn":
        return fused_attention(q, k, v, scale, "cudnn")
    if implementation != "blocked":
        raise ValueError(f"unknown attention implementation {implementation!r}; expected one of "
                         f"{ATTENTION_IMPLEMENTATIONS}")
    return blocked_attention(q, k, v, scale, block_size)


def fused_attention(q, k, v, scale: float, implementation: str):
    """`jax.nn.dot_product_attention(..., is_causal=True)` on this module's layout.

    q: [..., s, nh, d], k, v: [..., s, nkv, d] (one head dim: JAX's API takes v shaped like k).
    The leading axes are flattened into JAX's batch axis B ([B, T, N, H] layout; GQA by k/v
    having fewer heads, query head j reading kv head j // (nh // nkv) as here). implementation
    "cudnn" (GPU, bf16/fp16) or "xla". Returns [..., s, nh, d] in q.dtype.
    """
    *lead, seq, heads, dq = q.shape
    if k.shape[-1] != dq or v.shape[-1] != dq:
        raise ValueError(f"fused attention needs one head dim for q, k and v, got {dq}, {k.shape[-1]}, {v.shape[-1]}")
    flat = lambda x: x.reshape(-1, *x.shape[len(lead):])
    out = jax.nn.dot_product_attention(flat(q), flat(k), flat(v), scale=scale, is_causal=True,
                                       implementation=implementation)
    return out.reshape(*lead, seq, heads, dq)


def blocked_attention(q, k, v, scale: float, block_size: int | None = None):
    """`causal_attention` (same shapes and contract) by this module's own kernel, on any backend.

    Flash-style (`_attention`): the [s, s] probabilities are never kept for the backward pass
    (it recomputes them from q, k and the row log-sum-exp). With `block_size` < s the queries
    run in causal blocks: block j (queries [j*B, (j+1)*B)) reads only keys [0, (j+1)*B), so
    about half of the s x s scores are never formed and memory is O(B * s), not O(s^2)
    (`query_block` grows the block up to 4x to keep at most MAX_UNROLLED_BLOCKS of them; beyond
    that a scan over the blocks reads all keys, see `_attention`).
    q is scaled in float32 and rounded once to its dtype.
    """
    *lead, seq, heads, dq = q.shape
    kv_heads = k.shape[-2]
    block = query_block(seq, block_size)
    q = (q.astype(jnp.float32) * scale).astype(q.dtype).reshape(*lead, seq, kv_heads, heads // kv_heads, dq)
    out = _attention(jnp.moveaxis(q, -4, -2), jnp.moveaxis(k, -3, -2), jnp.moveaxis(v, -3, -2), block)
    return jnp.moveaxis(out, -2, -4).reshape(*lead, seq, heads, v.shape[-1])


def _block_scores(q, k, start):
    """Masked float32 scores [..., nkv, g, Bq, t] of the queries q [..., nkv, g, Bq, dq] at
    positions start + [0, Bq) against the keys k [..., nkv, t, dq] at positions [0, t)."""
    scores = einsum_f32("...kgqd,...ktd->...kgqt", q, k)
    rows = start + np.arange(q.shape[-2])[:, None]
    return jnp.where(rows >= np.arange(k.shape[-2])[None, :], scores, jnp.finfo(jnp.float32).min)


def _block_forward(q, k, v, start: int):
    """(out [..., nkv, g, Bq, dv] in v.dtype, row log-sum-exp [..., nkv, g, Bq] float32).

    The softmax is normalised after the PV product: [Bq, dv] divisions instead of [Bq, t].
    """
    scores = _block_scores(q, k, start)
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    unnormalized = jnp.exp(scores - row_max)
    total = jnp.sum(unnormalized, axis=-1, keepdims=True)
    out = einsum_f32("...kgqt,...ktd->...kgqd", unnormalized.astype(v.dtype), v)
    return (out / total).astype(v.dtype), (row_max + jnp.log(total))[..., 0]


def _block_backward(q, k, v, out, lse, d_out, start: int):
    """Gradients (dq [..., Bq, dq], dk [..., t, dq], dv [..., t, dv]) of one query block.

    P = exp(scores - lse) is exactly 0 where masked, so no gradient crosses the causal mask.
    """
    probs = jnp.exp(_block_scores(q, k, start) - lse[..., None])
    d_v = _contract_queries(d_out, probs.astype(v.dtype))
    d_probs = einsum_f32("...kgqd,...ktd->...kgqt", d_out, v)
    row_dot = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
    d_scores = (probs * (d_probs - row_dot)).astype(q.dtype)
    d_q = einsum_f32("...kgqt,...ktd->...kgqd", d_scores, k)
    return d_q, _contract_queries(q, d_scores), d_v


def _contract_queries(x, weights):
    """sum over (g, q) of x [..., nkv, g, Bq, d] times weights [..., nkv, g, Bq, t] -> [..., nkv, t, d].

    Computed as [d, t] then swapped: the big [Bq, t] operand keeps its row-major layout (XLA:CPU
    would otherwise transpose it in a slow fusion), only the small [d, t] result moves.
    """
    return jnp.swapaxes(einsum_f32("...kgqd,...kgqt->...kdt", x, weights), -1, -2)


MAX_UNROLLED_BLOCKS = 16
MAX_BLOCK_GROWTH = 4


def query_block(seq: int, block_size: int | None) -> int:
    """The query block the kernel runs for `seq` queries: `block_size` (None: seq, one block),
    grown up to MAX_BLOCK_GROWTH x where that keeps the blocks unrolled (at most
    MAX_UNROLLED_BLOCKS): ceil(seq / 16) rounded up to a multiple of block_size. Longer
    sequences keep block_size and scan (twice the causal FLOPs, see `_attention`); the growth
    costs O(growth x block x s) score memory, still linear in s. Measured on a 2-core CPU at
    b1 s4096 (blocks 64 -> 256): standard 0.80x, method5.2 0.63x the step time
    (benchmarks/README.md)."""
    if block_size is None or seq <= block_size:
        return seq
    unrolled = -(-seq // MAX_UNROLLED_BLOCKS)
    grown = -(-unrolled // block_size) * block_size
    return grown if grown <= MAX_BLOCK_GROWTH * block_size else block_size


def _causal_blocks(seq: int, block: int):
    """(query slice, key prefix length) of each causal block: block j = queries [jB, (j+1)B)
    over keys [0, (j+1)B), the last block possibly shorter. A static Python list: the blocks
    are unrolled, ceil(s / B) of them."""
    return [(slice(start, min(start + block, seq)), min(start + block, seq)) for start in range(0, seq, block)]


def _query_blocks(x, block: int):
    """[..., s, d] -> [ceil(s / block), ..., block, d], zero-padded at the end (the block index
    leading, for lax.map / lax.scan)."""
    pad = -x.shape[-2] % block
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, pad), (0, 0)])
    return jnp.moveaxis(x.reshape(*x.shape[:-2], x.shape[-2] // block, block, x.shape[-1]), -3, 0)


def _merge_query_blocks(x, seq: int):
    """The inverse of `_query_blocks` (padding dropped)."""
    x = jnp.moveaxis(x, 0, -3)
    return x.reshape(*x.shape[:-3], x.shape[-3] * x.shape[-2], x.shape[-1])[..., :seq, :]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _attention(q, k, v, block: int):
    """Causal attention on head-major operands q [..., nkv, g, s, dq] (already scaled),
    k [..., nkv, s, dq], v [..., nkv, s, dv] -> [..., nkv, g, s, dv], in query blocks.

    Up to MAX_UNROLLED_BLOCKS blocks are unrolled, each over its causal key prefix. Longer
    sequences scan over the query blocks (constant HLO size) against all keys, masked: twice
    the causal FLOPs, still O(block * s) memory.
    """
    return _attention_forward(q, k, v, block)[0]


def _attention_forward(q, k, v, block: int):
    seq = q.shape[-2]
    if -(-seq // block) <= MAX_UNROLLED_BLOCKS:
        outs, lses = zip(*(_block_forward(q[..., rows, :], k[..., :keys, :], v[..., :keys, :], rows.start)
                           for rows, keys in _causal_blocks(seq, block)))
        out, lse = jnp.concatenate(outs, axis=-2), jnp.concatenate(lses, axis=-1)
    else:
        starts = jnp.arange(-(-seq // block)) * block
        out, lse = jax.lax.map(lambda xs: _block_forward(xs[0], k, v, xs[1]), (_query_blocks(q, block), starts))
        out, lse = _merge_query_blocks(out, seq), _merge_query_blocks(lse[..., None], seq)[..., 0]
    return out, (q, k, v, out, lse)


def _attention_backward(block: int, residuals, d_out):
    q, k, v, out, lse = residuals
    seq = q.shape[-2]
    d_k, d_v = jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)
    if -(-seq // block) <= MAX_UNROLLED_BLOCKS:
        d_q = []
        for rows, keys in _causal_blocks(seq, block):
            d_q_block, d_k_block, d_v_block = _block_backward(
                q[..., rows, :], k[..., :keys, :], v[..., :keys, :], out[..., rows, :], lse[..., rows],
                d_out[..., rows, :], rows.start)
            d_q.append(d_q_block)
            d_k = d_k.at[..., :keys, :].add(d_k_block)
            d_v = d_v.at[..., :keys, :].add(d_v_block)
        d_q = jnp.concatenate(d_q, axis=-2)
    else:
        def step(carry, xs):
            q_b, out_b, lse_b, d_out_b, start = xs
            d_q_b, d_k_b, d_v_b = _block_backward(q_b, k, v, out_b, lse_b[..., 0], d_out_b, start)
            return (carry[0] + d_k_b, carry[1] + d_v_b), d_q_b

        xs = (*(_query_blocks(x, block) for x in (q, out, lse[..., None], d_out)),
              jnp.arange(-(-seq // block)) * block)
        (d_k, d_v), d_q = jax.lax.scan(step, (d_k, d_v), xs)
        d_q = _merge_query_blocks(d_q, seq)
    return d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype)


_attention.defvjp(_attention_forward, _attention_backward)


def attention_at_positions(q, k, v, scale: float, positions):
    """softmax(q k^T * scale + mask) v for queries at `positions` [n] (int, may be traced) over
    keys at positions [0, T): key u is visible to query j iff u <= positions[j] (the decoding
    form of `causal_attention`, dense: T is a cache, the queries few).

    q: [..., n, nh, dq], k: [..., T, nkv, dq], v: [..., T, nkv, dv], GQA as in causal_attention.
    Scores and softmax float32. Returns [..., n, nh, dv] in v.dtype.
    """
    *lead, n, heads, dq = q.shape
    kv_heads = k.shape[-2]
    q = (q * jnp.asarray(scale, q.dtype)).reshape(*lead, n, kv_heads, heads // kv_heads, dq)
    scores = jnp.einsum("...qkgd,...tkd->...kgqt", q, k, preferred_element_type=jnp.float32)
    visible = jnp.arange(k.shape[-3])[None, :] <= jnp.asarray(positions)[:, None]
    probs = jax.nn.softmax(jnp.where(visible, scores, jnp.finfo(jnp.float32).min), axis=-1)
    out = jnp.einsum("...kgqt,...tkd->...qkgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(*lead, n, heads, v.shape[-1]).astype(v.dtype)


def default_attention_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


# ----------------------------------------------------------------------------- stored probabilities
# The explicit [s, s] form (torch_ref's): what the "probs" attention state of methods 1-5 keeps.


def grouped_scores(q, k):
    """Raw scores S = Q K^T, float32 [..., nh, s, s], of q [..., s, nh, hd] and k [..., s, nkv, hd]
    (query head j reads kv head j // (nh // nkv))."""
    *lead, seq, heads, dq = q.shape
    kv_heads = k.shape[-2]
    q = jnp.moveaxis(q.reshape(*lead, seq, kv_heads, heads // kv_heads, dq), -4, -2)
    scores = jnp.einsum("...kgqd,...ktd->...kgqt", q, jnp.moveaxis(k, -3, -2), preferred_element_type=jnp.float32)
    return scores.reshape(*lead, heads, seq, seq)


def causal_softmax(logits):
    """Causal probabilities P = softmax(logits + mask), float32 [..., s, s]: the mask (query t
    reads keys u <= t) is applied to the float32 logits, so P is exactly 0 above the diagonal."""
    masked = jnp.where(causal_mask(logits.shape[-1]), logits.astype(jnp.float32), jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(masked, axis=-1)


def probs_attention(probs, v):
    """P V with grouped-query heads: probs [..., nh, s, s], v [..., s, nkv, dv] -> [..., s, nh, dv]
    in v.dtype (f32 accumulation). Stores nothing beyond its operands for the backward, which
    is two [s, s]-by-[s, dv] products (dP = dO V^T, dV = P^T dO)."""
    *lead, heads, seq, _ = probs.shape
    kv_heads, dv = v.shape[-2], v.shape[-1]
    grouped = probs.reshape(*lead, kv_heads, heads // kv_heads, seq, seq).astype(v.dtype)
    out = _probs_times_values(grouped, jnp.moveaxis(v, -3, -2))
    return jnp.moveaxis(out, -2, -4).reshape(*lead, seq, heads, dv)


@jax.custom_vjp
def _probs_times_values(probs, v):
    """probs [..., nkv, g, s, t] times v [..., nkv, t, dv] -> [..., nkv, g, s, dv]."""
    return jnp.einsum("...kgqt,...ktd->...kgqd", probs, v, preferred_element_type=jnp.float32).astype(v.dtype)


def _probs_times_values_forward(probs, v):
    return _probs_times_values(probs, v), (probs, v)


def _probs_times_values_backward(residuals, d_out):
    probs, v = residuals
    d_probs = jnp.einsum("...kgqd,...ktd->...kgqt", d_out, v, preferred_element_type=jnp.float32)
    return d_probs.astype(probs.dtype), _contract_queries(d_out, probs).astype(v.dtype)


_probs_times_values.defvjp(_probs_times_values_forward, _probs_times_values_backward)
