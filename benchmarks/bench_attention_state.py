"""Train-step time of the methods in each `attention_state` ("qk", "probs") vs torch_ref (and HF
sdpa for standard), interleaved in one process; the harness and model of bench_methods.py.

    python benchmarks/bench_attention_state.py --methods standard,method1,method2,method5.2
    python benchmarks/bench_attention_state.py --seq 1024 --batch 2 --out benchmarks/results/attention_state_1024.json

Per method it prints the median step time of each contender, its ratio to JAX standard, the
FLOP ratio of `model_flops` (the method's arithmetic with stored probabilities), their quotient
(the overhead; target <= 1.2) and the JAX speedup over torch_ref (target >= 1.25).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys


sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import bench_methods as bench  # noqa: E402

STATES = ("qk", "probs")


def measure(method: str, args) -> dict:
    """Median step seconds of jax per attention state, torch_ref and (standard) HF sdpa."""
    import jax
    import jax.numpy as jnp
    import transformers

    ids = bench.random_ids(args.batch, args.seq)
    model = bench.torch_model(method, args.layers, args.seq)
    states = ("qk",) if method == "standard" else STATES
    steps = {}
    for state in states:
        step, params, _ = bench.jax_train_step(method, args.layers, args.seq, model.state_dict(),
                                               attention_state=state)
        compiled = step.lower(params, jnp.asarray(ids)).compile()
        steps[f"jax_{state}"] = lambda c=compiled, p=params, i=jnp.asarray(ids): jax.block_until_ready(c(p, i))
    steps["torch_ref"] = bench.torch_step_fn(model, ids)
    if method == "standard":
        hf = transformers.LlamaForCausalLM(bench.hf_config(args.layers, args.seq))
        hf.load_state_dict(model.state_dict(), strict=False)
        steps["hf_sdpa"] = bench.hf_step_fn(hf, ids)
    times = bench.interleaved_medians(steps, args.rounds)
    return {name: t["median_s"] for name, t in times.items()} | {"all_s": {n: t["all_s"] for n, t in times.items()}}


def table(rows: dict, args) -> list[str]:
    standard = rows["standard"]
    flops0 = bench.model_flops("standard", args.batch, args.seq, args.layers)["total"]
    lines = ["| method | FLOP ratio | " + " | ".join(f"jax {s} ms | {s} ratio | {s} overhead | {s} vs torch_ref"
                                                     for s in STATES) + " | torch_ref ms | hf sdpa ms |",
             "|---" * (4 + 4 * len(STATES)) + "|"]
    for method, row in rows.items():
        flop_ratio = bench.model_flops(method, args.batch, args.seq, args.layers)["total"] / flops0
        cells = [method, f"{flop_ratio:.2f}"]
        for state in STATES:
            t = row.get(f"jax_{state}", row["jax_qk"])
            ratio = t / standard["jax_qk"]
            cells += [f"{t * 1e3:.0f}", f"{ratio:.2f}", f"{ratio / flop_ratio:.2f}", f"{row['torch_ref'] / t:.2f}x"]
        cells += [f"{row['torch_ref'] * 1e3:.0f}", f"{row['hf_sdpa'] * 1e3:.0f}" if "hf_sdpa" in row else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="standard,method1,method2,method5.2")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if any(os.environ.get(k) != v for k, v in bench.MALLOC_ENV.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **bench.MALLOC_ENV})
    methods = args.methods.split(",")
    if methods[0] != "standard":
        methods.insert(0, "standard")
    rows = {}
    for method in methods:
        rows[method] = measure(method, args)
        print(method, {k: round(v, 3) for k, v in rows[method].items() if k != "all_s"}, flush=True)
    print("\n".join(table(rows, args)))
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps({"args": vars(args), "machine": bench.machine_info(),
                                                      "rows": rows}, indent=1, default=float))


if __name__ == "__main__":
    main()
