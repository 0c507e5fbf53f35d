"""longest: the longest method1 sequence whose train step fits a memory cap, per framework."""

from __future__ import annotations

import time

import numpy as np

from child import describe_child, run_child
from harness import GiB, compiled_memory, jax_train_step, random_ids


def run(args) -> dict:
    """Longest method1 sequence (b=1, 8 layers) whose train step fits the memory cap.

    torch_ref: doubling s = 512, 1024, ... in child processes, each killed above the cap (RSS
    polled) or after --child-timeout-s; the last success is measured. Where the time limit
    rather than memory stops the search, a quadratic fit of peak RSS vs s over the measured
    points extrapolates to the cap. jax: XLA plans every buffer at compile time, so the
    compiled peak (temp + arguments + outputs) plus the runtime's fixed overhead (measured
    RSS minus compiled peak at the largest executed s) decides fit, doubling up to 2^20
    without executing; executed children validate the smaller sizes.
    """
    import jax.numpy as jnp

    cap = int(args.mem_cap_gb * GiB)
    deadline = time.perf_counter() + args.longest_budget_s
    out = {"cap_bytes": cap, "method": "method1", "batch": 1, "layers": 8}
    measured = {}
    for framework in ("torch", "jax"):
        seq, runs = 512, {}
        while time.perf_counter() < deadline:
            report = run_child(framework, "method1", seq, 1, 8, cap, min(args.child_timeout_s, deadline - time.perf_counter()))
            runs[seq] = report
            print(f"  longest {framework:5s} s={seq:6d}: " + describe_child(report), flush=True)
            if "failed" in report:
                break
            seq *= 2
        measured[framework] = runs
    out["runs"] = measured
    out["torch"] = longest_from_runs(measured["torch"], cap)
    overhead = max((r["peak_rss_bytes"] - r["jax_memory"]["peak_bytes"] for r in measured["jax"].values() if "failed" not in r),
                   default=0)
    seq, planned = 512, {}
    while seq <= 2**20:
        step, params, cfg = jax_train_step("method1", 8, seq)
        memory, _ = compiled_memory(step, params, jnp.asarray(random_ids(1, seq)))
        planned[seq] = memory["peak_bytes"] + overhead
        print(f"  longest jax   s={seq:6d}: compiled peak {memory['peak_bytes'] / GiB:.2f} GiB + overhead "
              f"{overhead / GiB:.2f} GiB", flush=True)
        if planned[seq] > cap:
            break
        seq *= 2
    fits = [s for s, b in planned.items() if b <= cap]
    out["jax"] = {"longest_seq": max(fits) if fits else None, "planned_bytes": planned, "runtime_overhead_bytes": overhead,
                  "how": "compiled memory_analysis + measured runtime overhead"}
    if out["torch"]["longest_seq"] and out["jax"]["longest_seq"]:
        out["jax_over_torch"] = out["jax"]["longest_seq"] / out["torch"]["longest_seq"]
    return out


def longest_from_runs(runs: dict, cap: int) -> dict:
    ok = {s: r["peak_rss_bytes"] for s, r in runs.items() if "failed" not in r}
    failed = [s for s, r in runs.items() if "failed" in r]
    result = {"longest_measured_seq": max(ok) if ok else None, "how": "measured"}
    result["longest_seq"] = result["longest_measured_seq"]
    if failed and runs[min(failed)]["failed"] == "time limit" and len(ok) >= 2:
        seqs = np.array(sorted(ok), float)
        coeffs = np.polyfit(seqs, [ok[s] for s in sorted(ok)], min(2, len(ok) - 1))
        roots = [r.real for r in np.roots(coeffs - np.array([0] * (len(coeffs) - 1) + [cap])) if r.real > 0 and abs(r.imag) < 1e-6]
        if roots:
            result.update(longest_seq=int(2 ** np.floor(np.log2(min(roots)))), extrapolated_seq_at_cap=float(min(roots)),
                          how="quadratic fit of measured peak RSS, extrapolated to the cap (time limit reached)")
    return result
