"""attention: causal attention forms (dense, query blocks, jax.nn.dot_product_attention) and
method 5's score forms, forward + backward."""

from __future__ import annotations

from harness import interleaved_medians


def run(args) -> dict:
    """causal_attention forward+backward on [b, s, nh, hd]: dense (one block), query blocks of
    512 / 256, and jax.nn.dot_product_attention (XLA); plus method 5's score forms. On CUDA
    also bf16: the blocked kernel (blocks of 64, the model's default) vs cuDNN."""
    import jax
    import jax.numpy as jnp

    from jax_residual.kernels import attention as A

    b, nh, nkv, hd = 1, 8, 4, 32
    out = {}
    seqs = (1024, 4096) if args.quick else (256, 1024, 4096)
    for seq in seqs:
        key = jax.random.split(jax.random.PRNGKey(0), 3)
        q = jax.random.normal(key[0], (b, seq, nh, hd))
        k = jax.random.normal(key[1], (b, seq, nkv, hd))
        v = jax.random.normal(key[2], (b, seq, nkv, hd))
        variants = {
            "dense": lambda q, k, v: A.causal_attention(q, k, v, hd**-0.5),
            "blocks_512": lambda q, k, v, seq=seq: A.causal_attention(q, k, v, hd**-0.5, min(512, seq)),
            "blocks_256": lambda q, k, v: A.causal_attention(q, k, v, hd**-0.5, 256),
            "jax.nn.dot_product_attention": lambda q, k, v: jax.nn.dot_product_attention(
                q, k, v, scale=hd**-0.5, is_causal=True, implementation="xla"),
        }
        out[seq] = grad_variants(variants, (q, k, v), args, f"attention s={seq}")
        if A.backend_platform() == "cuda":  # what the bf16 dispatch picks there, against the fallback
            bf16 = tuple(x.astype(jnp.bfloat16) for x in (q, k, v))
            out[f"{seq}_bf16"] = grad_variants(
                {name: lambda q, k, v, name=name: A.causal_attention(q, k, v, hd**-0.5, 64, implementation=name)
                 for name in A.ATTENTION_IMPLEMENTATIONS}, bf16, args, f"attention bf16 s={seq}")
    out["method5"] = method5_scores(args)
    return out


def grad_variants(variants, inputs, args, label) -> dict:
    import jax
    import jax.numpy as jnp

    steps, rows = {}, {}
    for name, fn in variants.items():
        grad = jax.jit(jax.grad(lambda *x, fn=fn: jnp.sum(fn(*x) ** 2), argnums=tuple(range(len(inputs)))))
        compiled = grad.lower(*inputs).compile()
        analysis = compiled.memory_analysis()
        rows[name] = {"temp_bytes": int(analysis.temp_size_in_bytes)}
        steps[name] = lambda c=compiled: jax.block_until_ready(c(*inputs))
    for name, t in interleaved_medians(steps, args.rounds).items():
        rows[name].update(t)
        print(f"  {label:20s} {name:30s} {t['median_s'] * 1e3:8.1f} ms  temp {rows[name]['temp_bytes'] / 2**20:8.1f} MiB",
              flush=True)
    return rows


def method5_scores(args) -> dict:
    """sum_{i<=l} c_i Q_i K_i^T then softmax and PV, at l = L-1 with L = 8 stored layers
    (b=8, s=256): the concatenated single contraction (the model's form) vs summing L
    per-layer score matrices (a naive form whose backward keeps every [s, s] term)."""
    import jax
    import jax.numpy as jnp

    from jax_residual.kernels import attention as A

    L, b, s, nh, nkv, hd = args.layers, args.batch, args.seq, 8, 4, 32
    key = jax.random.split(jax.random.PRNGKey(1), 4)
    q = jax.random.normal(key[0], (L, b, s, nh, hd))
    k = jax.random.normal(key[1], (L, b, s, nkv, hd))
    v = jax.random.normal(key[2], (b, s, nkv, hd))
    c = jnp.full((L,), (L**-0.5) * hd**-0.5)

    def concatenated(q, k, v):
        q_cat = jnp.moveaxis(q * c[:, None, None, None, None], 0, -2).reshape(b, s, nh, L * hd)
        return A.causal_attention(q_cat, jnp.moveaxis(k, 0, -2).reshape(b, s, nkv, L * hd), v, 1.0)

    def summed(q, k, v):
        g = nh // nkv
        scores = jnp.einsum("lbqkgd,lbtkd,l->bkgqt", q.reshape(L, b, s, nkv, g, hd), k, c)
        scores = jnp.where(A.causal_mask(s), scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1)
        return jnp.einsum("bkgqt,btkd->bqkgd", probs, v).reshape(b, s, nh, hd)

    return grad_variants({"concatenated_qk": concatenated, "sum_of_scores": summed}, (q, k, v), args, "method5 scores")
