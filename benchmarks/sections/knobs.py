"""knobs: the cost knobs of methods 1-4 (rerun_window, rerun_every): time, memory, FLOPs."""

from __future__ import annotations

from harness import bench_config, step_flops, timed_variants


KNOBS = {"all earlier layers": {}, "window=1": {"rerun_window": 1}, "window=2": {"rerun_window": 2},
         "window=4": {"rerun_window": 4}, "every=2": {"rerun_every": 2}, "every=4": {"rerun_every": 4},
         "window=4,every=2": {"rerun_window": 4, "rerun_every": 2}}


def run(args) -> dict:
    """The cost knobs of methods 1-4 (rerun_window, rerun_every), method1 and method2 at batch
    --knob-batch: time and memory against re-running all earlier layers, next to the FLOP ratio
    the knob predicts (linear-memory count)."""
    out = {"batch": args.knob_batch}
    for method in ("method1", "method2"):
        rows = timed_variants(method, KNOBS, args, batch=args.knob_batch)
        cfg = bench_config(method, args.layers, args.seq)
        base = step_flops(cfg, args.knob_batch, args.seq)["total_linear_memory"]
        for row in rows.values():
            knob_flops = step_flops(cfg.replace(**row["overrides"]), args.knob_batch, args.seq)
            row["flops_vs_first"] = knob_flops["total_linear_memory"] / base
        print("  flops vs first: " + ", ".join(f"{n} x{r['flops_vs_first']:.2f}" for n, r in rows.items()), flush=True)
        out[method] = rows
    return out
