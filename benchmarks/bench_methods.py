"""Train-step speed and memory of the 12 residual methods: jax_residual vs torch_ref vs HF.

    python benchmarks/bench_methods.py                       # default sections, all methods
    python benchmarks/bench_methods.py --quick --methods standard,method1
    python benchmarks/bench_methods.py --sections memory     # memory vs sequence length / depth
    python benchmarks/bench_methods.py --sections longest    # longest method1 sequence per framework
    python benchmarks/bench_methods.py --sections seq1024    # method1/2 vs torch_ref at seq 1024

One "train step" = forward + mean next-token cross-entropy + backward to every parameter (no
optimiser), on identical weights (harness.py). Timings are medians over interleaved rounds (each round runs every contender once), so
load from other processes hits all of them alike; ratios within one run are the numbers to read.
Devices: JAX runs on its default backend; torch_ref and HF run on CUDA when torch sees a GPU
(`torch_device`), else on the CPU; both are recorded under "machine" in the JSON. On a CUDA
backend the attention section adds bf16 rows: the blocked kernel vs the cuDNN path that
`functional.causal_attention` dispatches to there.

Layout: harness.py (model, steps, timing, memory, FLOPs), child.py (one step in a child
process, RSS), sections/<name>.py (one per section, `run(args) -> dict`), report.py (tables).

Sections (each writes its part of the JSON; a later run merges into the same file; the speed
section is stored per shape, "speed_b<batch>_s<seq>"; --summarize ends with the target table):
  peak      fp32 2048x2048 matmul FLOP/s in JAX and torch (the MFU denominator)
  speed     per method: step time, tokens/s, ratio to standard (same framework) vs the FLOP ratio
            of `jax_residual.train.flops`, MFU; torch_ref eager; HF LlamaForCausalLM (sdpa) for standard
  remat     method1 with remat none / recompute / layer: time and XLA temp memory (batch 2)
  knobs     method1 and method2 with rerun_window 1/2/4 and rerun_every 2/4: time, memory, FLOPs
  chunks    method1 and method2 with recompute_chunk_size 1, 2, 4, 8; method2 with
            attention_block_size None (dense) / 128 / 64 / 32 (batch 2)
  attention causal_attention: dense vs query-blocked vs jax.nn.dot_product_attention, and
            method 5's concatenated-Q/K contraction vs a per-layer score sum
  memory    compiled train-step memory (XLA buffer assignment) vs sequence length and depth,
            the stored Q/K state, and measured peak RSS of one step in a child process
  longest   longest method1 (b=1, 8 layers) sequence within a memory cap, per framework
  seq1024   standard / method1 / method2 at seq 1024 (batch 2): jax vs torch_ref
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import child  # noqa: E402  (benchmarks/ is this script's directory, first on sys.path)
import harness  # noqa: E402
import report  # noqa: E402
from harness import MALLOC_ENV  # noqa: E402

METHODS = ("standard", "method1", "method2", "method3.1", "method3.2", "method4.1", "method4.2",
           "method5.1", "method5.2", "method5.3", "method5.4", "method5.5")
DEFAULT_SECTIONS = ("peak", "speed", "remat", "knobs", "chunks", "attention")
ALL_SECTIONS = DEFAULT_SECTIONS + ("memory", "longest", "seq1024")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="all", help="comma-separated methods, or 'all'")
    parser.add_argument("--sections", default=",".join(DEFAULT_SECTIONS), help=f"comma-separated of {ALL_SECTIONS}, or 'all'")
    parser.add_argument("--quick", action="store_true", help="2 timing rounds, fewer variants")
    parser.add_argument("--rounds", type=int, default=None, help="timing rounds after a warm-up (default 3; --quick 2)")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--knob-batch", type=int, default=2, help="batch of the remat and chunks sections")
    parser.add_argument("--no-torch", action="store_true", help="jax only in the speed section")
    parser.add_argument("--no-malloc-tuning", action="store_true", help="keep glibc's default malloc settings")
    parser.add_argument("--mem-cap-gb", type=float, default=8.0, help="memory cap of the child processes")
    parser.add_argument("--child-timeout-s", type=float, default=300.0)
    parser.add_argument("--longest-budget-s", type=float, default=1200.0)
    parser.add_argument("--summarize", action="store_true", help="only print the tables of the results JSON")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_methods.json"))
    args = parser.parse_args(argv)
    args.methods = list(METHODS) if args.methods == "all" else args.methods.split(",")
    unknown = set(args.methods) - set(METHODS)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; expected {METHODS}")
    args.sections = list(ALL_SECTIONS) if args.sections == "all" else args.sections.split(",")
    if set(args.sections) - set(ALL_SECTIONS):
        parser.error(f"unknown sections {sorted(set(args.sections) - set(ALL_SECTIONS))}; expected {ALL_SECTIONS}")
    args.rounds = args.rounds or (2 if args.quick else 3)
    return args


def section_key(name: str, args) -> str:
    """Where a section's results go in the JSON: its name, and for the speed section its shape
    too (speed_b8_s256), so runs at several shapes sit side by side for the target table."""
    return f"{name}_b{args.batch}_s{args.seq}" if name == "speed" else name


def main(argv=None):
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        framework, method, seq, batch, layers = sys.argv[2], sys.argv[3], *map(int, sys.argv[4:7])
        print(json.dumps(child.child_step(framework, method, seq, batch, layers)))
        return
    args = parse_args(argv)
    if not args.no_malloc_tuning and any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC_ENV})
    out_path = pathlib.Path(args.out)
    results = json.loads(out_path.read_text()) if out_path.exists() else {}
    if args.summarize:
        print("\n".join(report.summarize(results)))
        return
    results["machine"] = {**harness.machine_info(), "malloc_env": {} if args.no_malloc_tuning else MALLOC_ENV}
    start = time.perf_counter()
    for name in args.sections:
        print(f"== {name}", flush=True)
        section_start = time.perf_counter()
        key = section_key(name, args)
        results[key] = importlib.import_module(f"sections.{name}").run(args)
        results[key + "_wall_s"] = time.perf_counter() - section_start
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(results, indent=1, default=str))
    print("\n".join(report.summarize(results)))
    print(f"total {time.perf_counter() - start:.0f}s; results in {out_path}")


if __name__ == "__main__":
    main()
