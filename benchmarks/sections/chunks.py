"""chunks: recompute_chunk_size of methods 1-2, and the attention query block size."""

from __future__ import annotations

from harness import timed_variants


def run(args) -> dict:
    """method1 and method2 (batch --knob-batch) with recompute_chunk_size 1, 2, 4, 8, and the
    attention query block size (method2: None = dense, 128, 64, 32)."""
    sizes = (1, 2, 4, 8) if not args.quick else (1, 4, 8)
    out = {"batch": args.knob_batch}
    for method in ("method1", "method2"):
        out[method] = timed_variants(method, {f"chunk={c}": {"recompute_chunk_size": c} for c in sizes}, args,
                                     batch=args.knob_batch)
    out["attention_block_size"] = timed_variants(
        "method2", {f"block={b}": {"attention_block_size": b} for b in (None, 128, 64, 32)}, args, batch=args.knob_batch)
    return out
