"""Command line of train_tpu_gpu.py: flags -> RunConfig -> checked plan -> training (or a sweep).

Everything that can be wrong with the flags is reported before anything compiles. The
process is prepared first (simulated host devices, jax.distributed) because both must happen
before JAX starts its backends.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import pathlib
import sys

import jax

from jax_residual.config import DTYPES, REMAT_POLICIES
from jax_residual.connections import knob_fields, method_names
from jax_residual.connections.base import knob_help
from jax_residual.command_line import OneLineParser
from jax_residual.sharding import parse_mesh_shape
from jax_residual.train import checkpoint, faults, loop, sweep
from jax_residual.train.budget import Budget, parse_budget
from jax_residual.train.run_config import DEFAULT_METHOD, PRESETS, RunConfig
from jax_residual.data.tokenizer import parse_spec

DEFAULTS = RunConfig()
HOST_DEVICES_FLAG = "--xla_force_host_platform_device_count"
DEFAULT_COMPILE_CACHE = pathlib.Path.home() / ".cache" / "jax_residual" / "xla"


def sweep_entries(text: str) -> tuple[str, ...]:
    """'method1,hyper_connections:hc_dynamic=true' -> ('method1', 'hyper_connections:hc_dynamic=true'),
    each checked by sweep.parse_entry (a known method, knobs it reads)."""
    entries = tuple(e.strip() for e in text.split(",") if e.strip())
    if not entries:
        raise argparse.ArgumentTypeError(f"no method given; allowed: {', '.join(method_names())}")
    try:
        for entry in entries:
            sweep.parse_entry(entry)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return entries


def tokenizer_spec(text: str) -> str:
    """--tokenizer: 'bytes' or 'bpe:N' (tokenizer.parse_spec), as an argparse type."""
    try:
        return parse_spec(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def budget_flag(text: str) -> Budget:
    """--budget: 'steps=N' or 'flops=F' (budget.parse_budget), as an argparse type."""
    try:
        return parse_budget(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def build_parser() -> argparse.ArgumentParser:
    d = DEFAULTS
    parser = OneLineParser(
        prog="train_tpu_gpu.py",
        description="Train a Llama-style byte-level LM whose residual connections reach back across layers. "
                    "With no arguments: a 1.7M-parameter model on the Python standard library's own sources "
                    "(read from this interpreter, split train/validation by file) for a few minutes on a CPU. "
                    "Rerunning the same command resumes it from its latest checkpoint.",
        epilog="Exit status: 0 done, 2 invalid flags (reported before anything compiles), 3 stopped on a "
               "non-finite loss (the last good checkpoint is kept), 4 stopped by SIGTERM/SIGINT after saving "
               "the step in progress, 5 a process of a multi-process run was lost, 6 a checkpoint could not "
               "be written (the previous one is kept); rerunning the same command resumes in every case. "
               "Multi-process: start one process per host with the same flags plus --coordinator, "
               "--num-processes and --process-id.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    model = parser.add_argument_group("model")
    model.add_argument("--method", default=d.method, choices=method_names(), metavar="METHOD",
                       help=f"residual method, one of: {', '.join(method_names())}. The default, {DEFAULT_METHOD}, "
                            "sums the attention scores of all layers so far (their stored Q/K), scaled by "
                            "1/sqrt(hd*m): among the cross-layer methods with the fewest extra FLOPs (no earlier "
                            "layer is re-run), so the few-minute default run trains the most "
                            "(step times per method: benchmarks/README.md)")
    model.add_argument("--preset", default=d.preset, choices=sorted(PRESETS),
                       help="model size: " + "; ".join(f"{name}: hidden {h}, {n} layers, {nh} heads / {nkv} kv, mlp {i}"
                                                       for name, (h, n, nh, nkv, i) in PRESETS.items()))
    model.add_argument("--hidden-size", type=int, help="override the preset's hidden size")
    model.add_argument("--num-layers", type=int, help="override the preset's number of layers")
    model.add_argument("--num-heads", type=int, help="override the preset's number of query heads")
    model.add_argument("--num-kv-heads", type=int, help="override the preset's number of key/value heads (GQA)")
    model.add_argument("--intermediate-size", type=int, help="override the preset's MLP size")
    model.add_argument("--dtype", default=d.dtype, choices=DTYPES,
                       help="compute dtype (parameters and optimiser state stay float32)")
    model.add_argument("--remat", default=d.remat, choices=REMAT_POLICIES,
                       help="activation checkpointing: none; recompute (the re-run of earlier layers); "
                            "layer (each whole layer, memory linear in depth)")
    for field in knob_fields().values():  # every registered scheme's knobs, from their dataclasses
        kind = ({"action": "store_true"} if isinstance(field.default, bool) else
                {"type": str, "metavar": "TEXT"} if isinstance(field.default, str) else {"type": int, "metavar": "N"})
        model.add_argument(f"--{field.name.replace('_', '-')}", dest=field.name, default=argparse.SUPPRESS,
                           help=f"{knob_help(field)} (default: {field.default})", **kind)
    model.add_argument("--init-from-hf", metavar="FOLDER",
                       help="start from a HuggingFace Llama checkpoint folder (save_pretrained, safetensors); "
                            "its config fixes the sizes. Its tokenizer.json, if it has one, tokenizes the data "
                            "(see --tokenizer)")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--steps", type=int, default=d.steps,
                       help="total optimiser steps; rerunning with a larger value continues the run (without "
                            "--decay-steps the cosine schedule is stretched to the new total from the current step)")
    optim.add_argument("--batch-size", type=int, default=d.batch_size,
                       help="global batch (sequences per optimiser step, over all devices and micro-batches)")
    optim.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens (bytes) per sequence")
    optim.add_argument("--grad-accum", type=int, default=d.grad_accum,
                       help="split each batch into this many micro-batches and average their gradients")
    optim.add_argument("--lr", type=float, default=d.lr, help="peak learning rate of AdamW")
    optim.add_argument("--warmup-steps", type=int,
                       help=f"linear warmup steps, then cosine decay to 10%% of --lr at --decay-steps (default: "
                            f"{d.warmup_steps}, or half the schedule when it is not longer than that)")
    optim.add_argument("--decay-steps", type=int,
                       help="length of the warmup + cosine schedule (default: --steps); fix it to train a run in "
                            "several invocations of growing --steps on one schedule (constant 10%% after it)")
    optim.add_argument("--weight-decay", type=float, default=d.weight_decay,
                       help="AdamW weight decay of the matrices (norm scales and the methods' learnable "
                            "weights are in their own groups, without decay)")
    optim.add_argument("--grad-clip", type=float, default=d.grad_clip, help="clip gradients to this global norm")
    optim.add_argument("--seed", type=int, default=d.seed,
                       help="seed of the initial parameters (and of the data order)")
    optim.add_argument("--data-seed", type=int, help="seed of the data order, if not --seed; batch k is a pure "
                                                     "function of (data seed, k)")

    io = parser.add_argument_group("data and output")
    io.add_argument("--data", metavar="PATH",
                    help="a corpus prepared by `python -m jax_residual.prepare`, or a raw source it reads (text "
                         "folder, text file, .jsonl[.gz], .parquet, datasets save_to_disk folder), prepared into "
                         "the run folder's data/ first with --tokenizer; default: the standard library's sources. "
                         "Documents are split train/validation/test by hash; evaluation reads validation")
    io.add_argument("--tokenizer", type=tokenizer_spec, metavar="SPEC",
                    help="bytes (the default: ids 0-255) or bpe:N (a byte-level BPE of N tokens trained on the "
                         "train split, saved as tokenizer.json in the run folder and reused on resume; the model's "
                         "vocabulary is N). With --init-from-hf and no --tokenizer: the folder's tokenizer.json if "
                         "it has one. Validation loss is also logged in bits per byte (val_bpb) to compare them")
    io.add_argument("--output-dir", help="output folder (default: runs/<method>-<preset>-seed<seed>-<hash of the "
                                         "settings>, so the same command resumes the same run)")
    io.add_argument("--eval-every", type=int, default=d.eval_every, help="validation loss every this many steps")
    io.add_argument("--eval-batches", type=int, default=d.eval_batches,
                    help="validation batches (of --batch-size sequences) per evaluation")
    io.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, help="checkpoint every this many steps")
    io.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints, help="keep the last N checkpoints")
    io.add_argument("--compile-cache", metavar="DIR",
                    default=os.environ.get("JAX_COMPILATION_CACHE_DIR", str(DEFAULT_COMPILE_CACHE)),
                    help="persistent XLA compilation cache (a resumed run or a sweep's later seeds skip "
                         "compiling); '' disables it (env JAX_COMPILATION_CACHE_DIR)")
    io.add_argument("--peak-tflops", type=float,
                    help="peak TFLOP/s per device for MFU (default: a table of known accelerators; none on CPU)")

    dist = parser.add_argument_group("distributed")
    dist.add_argument("--mesh", help="device mesh, e.g. data=4,tensor=2 (axes data, fsdp, tensor; default: "
                                     "data=<all devices>). On a CPU the devices are simulated when the mesh "
                                     "needs more than one per process")
    dist.add_argument("--coordinator", default=os.environ.get("JAX_COORDINATOR_ADDRESS"),
                      help="HOST:PORT of process 0, for a multi-process run (env JAX_COORDINATOR_ADDRESS)")
    dist.add_argument("--num-processes", type=int, default=int(os.environ.get("JAX_NUM_PROCESSES", 1)),
                      help="number of processes (env JAX_NUM_PROCESSES)")
    dist.add_argument("--process-id", type=int, default=int(os.environ.get("JAX_PROCESS_ID", 0)),
                      help="this process's index (env JAX_PROCESS_ID); only process 0 writes logs and plots")
    dist.add_argument("--heartbeat-timeout", type=int, default=d.heartbeat_timeout, metavar="SECONDS",
                      help="a process silent this long counts as lost: the others stop (exit status 5) within "
                           "about this time, naming it")

    sweeps = parser.add_argument_group("sweeps")
    sweeps.add_argument("--sweep", type=sweep_entries, metavar="M1,M2,...",
                        help="train each of these methods for --seeds seeds (same data order for all runs) and "
                             "write a table, validation curves and the learned per-layer weights; an entry "
                             "METHOD:KNOB=VALUE sets that method's scheme knobs (hyper_connections:hc_dynamic=true)")
    sweeps.add_argument("--seeds", type=int, default=1, help="seeds per method in a sweep: --seed, --seed+1, ...")
    sweeps.add_argument("--budget", type=budget_flag, metavar="steps=N|flops=F",
                        help="training budget of each sweep run: steps=N (every method N steps; default "
                             "steps=--steps) or flops=F (each method the steps F buys at its FLOPs per step, "
                             "floor(F / (FLOPs/token x tokens/step)); its schedule follows its own steps)")

    io.add_argument("--sample-tokens", type=int, default=RunConfig.sample_tokens, metavar="N",
                    help="a single run ends by printing a sample of N tokens from its final checkpoint "
                         "(0: none; more with `python -m jax_residual.sample RUN_DIR`)")
    parser.add_argument("--inject-nan-at", type=int, metavar="STEP",
                        help="testing: make the parameters NaN before step STEP (0-based) to exercise the stop")
    return parser


def run_config(args: argparse.Namespace) -> RunConfig:
    """The RunConfig named by the flags (the fields of RunConfig are flag names; the scheme knobs
    given are its `knobs`)."""
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    knobs = {name: getattr(args, name) for name in knob_fields() if hasattr(args, name)}
    run = RunConfig(**{name: value for name, value in vars(args).items() if name in fields}).with_knobs(**knobs)
    return run.replace(warmup_steps=default_warmup(run)) if args.warmup_steps is None else run


def default_warmup(run: RunConfig) -> int:
    """--warmup-steps left out: the default, or half the schedule when that is not longer."""
    return DEFAULTS.warmup_steps if DEFAULTS.warmup_steps < run.schedule_steps else run.schedule_steps // 2


def prepare_process(args: argparse.Namespace, parser: argparse.ArgumentParser):
    """Before JAX starts: check the process flags, simulate the mesh's devices on a CPU host, join
    a multi-process run and turn on the compilation cache.

    XLA's host-device flag affects the CPU platform only, so it is harmless on accelerators.
    """
    if args.num_processes < 1 or not 0 <= args.process_id < args.num_processes:
        parser.error(f"need --num-processes >= 1 and 0 <= --process-id < --num-processes, got "
                     f"{args.num_processes} and {args.process_id}")
    if args.seeds < 1:
        parser.error(f"--seeds must be >= 1, got {args.seeds}")
    if args.heartbeat_timeout < 1:
        parser.error(f"--heartbeat-timeout must be >= 1, got {args.heartbeat_timeout}")
    try:
        mesh_shape = parse_mesh_shape(args.mesh)
    except ValueError as error:
        parser.error(str(error))
    devices = math.prod(mesh_shape.values())
    if devices % args.num_processes:
        parser.error(f"--mesh {args.mesh} has {devices} devices, not divisible by --num-processes {args.num_processes}")
    per_process = devices // args.num_processes
    if per_process > 1 and HOST_DEVICES_FLAG not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {HOST_DEVICES_FLAG}={per_process}".strip()
    if args.compile_cache:
        jax.config.update("jax_compilation_cache_dir", args.compile_cache)
    if args.num_processes > 1:
        if not args.coordinator:
            parser.error("a multi-process run needs --coordinator HOST:PORT (or JAX_COORDINATOR_ADDRESS)")
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        # recoverable: a lost process is not fatal to the others at once, so they can name it and stop
        jax.config.update("jax_enable_recoverability", True)
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                                   heartbeat_timeout_seconds=args.heartbeat_timeout)


FAULT_STATUS = ((loop.NonFiniteLoss, 3), (faults.Preempted, faults.PREEMPTED), (faults.PeerLost, faults.PEER_LOST),
                (checkpoint.SaveFailed, faults.SAVE_FAILED))


def main(argv=None, after_single_run=None, devices=None) -> int:
    """Exit status: 0 done, 2 invalid flags (nothing compiled), 3 stopped on a non-finite loss,
    4 stopped by a signal (saved), 5 a process lost, 6 a checkpoint not written (faults.py).
    `after_single_run(folder, sample_tokens)`: what the entry point does after a single run that
    asks for a sample (train_tpu_gpu.py prints one; the trainer itself imports no sampler).
    `devices`: the devices the runs use (default: all of this process's), for the command run
    inside a process that holds more devices than the run should see."""
    parser = build_parser()
    args = parser.parse_args(argv)
    prepare_process(args, parser)
    status = run_command(args, parser, after_single_run, devices)
    if args.num_processes > 1 and status != faults.PEER_LOST:
        faults.leave_together(args.heartbeat_timeout)
    return status


def run_command(args: argparse.Namespace, parser: argparse.ArgumentParser, after_single_run=None,
                devices=None) -> int:
    """The run or sweep the flags name, in a prepared process, on `devices` (None: all); main's
    exit status."""
    run = run_config(args)
    try:
        if args.budget and not args.sweep:
            raise ValueError("--budget applies to a --sweep; a single run trains --steps steps")
        plans = (sweep.plan_sweep(run, args.sweep, args.seeds, args.budget, devices) if args.sweep
                 else [loop.plan(run, devices)])
    except (ValueError, OSError) as error:  # bad flags, paths or files: reported, no traceback
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    try:
        report = (sweep.summary(sweep.run_sweep(plans, sweep.sweep_dir(run, args.sweep, args.seeds))) if args.sweep
                  else loop.summary(loop.train(plans[0])))
    except tuple(fault for fault, _ in FAULT_STATUS) as error:
        print(f"error: {error}", file=sys.stderr)
        return next(status for fault, status in FAULT_STATUS if isinstance(error, fault))
    if jax.process_index() == 0:
        print(report)
    if after_single_run is not None and not args.sweep and run.sample_tokens > 0 and jax.process_count() == 1:
        after_single_run(plans[0].folder, run.sample_tokens)
    return 0
