"""speed: per method, JAX and torch_ref step times in interleaved rounds (HF sdpa with standard),
tokens/s, MFU, and the time ratio to standard next to the FLOP ratio."""

from __future__ import annotations

import time

from harness import (compiled_memory, hf_config, hf_step_fn, interleaved_medians, jax_train_step, random_ids,
                     step_flops, torch_device, torch_model, torch_step_fn)
from sections.peak import MATMUL_FLOPS, matmul_peak_steps


def run(args) -> dict:
    """Per method: jax and torch_ref step times in interleaved rounds; HF sdpa with standard."""
    import jax
    import jax.numpy as jnp

    peak_steps = matmul_peak_steps()
    ids = random_ids(args.batch, args.seq)
    tokens = args.batch * args.seq
    rows = {}
    for method in args.methods:
        model = torch_model(method, args.layers, args.seq)
        step, params, cfg = jax_train_step(method, args.layers, args.seq, model.state_dict())
        jax_ids = jnp.asarray(ids)
        start = time.perf_counter()
        memory, compiled = compiled_memory(step, params, jax_ids)
        compile_s = time.perf_counter() - start
        steps = {"jax": lambda c=compiled, p=params, i=jax_ids: jax.block_until_ready(c(p, i)), **peak_steps}
        if not args.no_torch:
            steps["torch_ref"] = torch_step_fn(model, ids)
            if method == "standard":
                import transformers

                hf = transformers.LlamaForCausalLM(hf_config(args.layers, args.seq)).to(torch_device())
                hf.load_state_dict(model.state_dict(), strict=False)
                steps["hf_sdpa"] = hf_step_fn(hf, ids)
        times = interleaved_medians(steps, args.rounds)
        flops = step_flops(cfg, args.batch, args.seq)
        row = {"flops": flops, "jax_compile_s": compile_s, "jax_memory": memory,
               "peak_flops_per_s": {name: MATMUL_FLOPS / times.pop(f"matmul_{name}")["median_s"] for name in ("jax", "torch")}}
        for name, t in times.items():
            framework_peak = row["peak_flops_per_s"]["jax" if name == "jax" else "torch"]
            row[name] = {**t, "tokens_per_s": tokens / t["median_s"], "mfu": flops["total"] / t["median_s"] / framework_peak}
        rows[method] = row
        print(format_speed_row(method, row), flush=True)
        del model, compiled
    add_ratios(rows)
    return {"batch": args.batch, "seq": args.seq, "layers": args.layers, "rounds": args.rounds, "methods": rows}


def add_ratios(rows: dict) -> None:
    """time ratio to standard (same framework) next to the FLOP ratio; their quotient is the
    overhead above the arithmetic limit (1.0 = the method costs exactly its extra FLOPs)."""
    if "standard" not in rows:
        return
    base = rows["standard"]
    for row in rows.values():
        row["flop_ratio"] = row["flops"]["total"] / base["flops"]["total"]
        row["flop_ratio_linear_memory"] = row["flops"]["total_linear_memory"] / base["flops"]["total"]
        for name in ("jax", "torch_ref"):
            if name in row and name in base:
                ratio = row[name]["median_s"] / base[name]["median_s"]
                row[name]["time_ratio"] = ratio
                row[name]["overhead_vs_flops"] = ratio / row["flop_ratio"]
                row[name]["overhead_vs_linear_memory_flops"] = ratio / row["flop_ratio_linear_memory"]
        if "jax" in row and "torch_ref" in row:
            row["jax_speedup_vs_torch_ref"] = row["torch_ref"]["median_s"] / row["jax"]["median_s"]


def format_speed_row(method, row) -> str:
    parts = [f"{method:10s} GFLOP {row['flops']['total'] / 1e9:7.1f}"]
    for name in ("jax", "torch_ref", "hf_sdpa"):
        if name in row:
            mfu = row[name]["mfu"]
            parts.append(f"{name} {row[name]['median_s'] * 1e3:8.1f} ms" + ("" if mfu is None else f" (MFU {mfu:4.0%})"))
    parts.append(f"xla temp {row['jax_memory']['temp'] / 2**20:6.0f} MiB  compile {row['jax_compile_s']:.0f}s")
    return "  ".join(parts)
