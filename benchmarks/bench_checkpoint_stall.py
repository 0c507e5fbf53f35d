"""How long a checkpoint save stalls training: the time of a train step that is followed by a
save (the save call included) minus that of a plain step, with orbax saving asynchronously
(what train/loop.py does) and synchronously.

    python benchmarks/bench_checkpoint_stall.py                 # preset small, batch 16, seq 128
    python benchmarks/bench_checkpoint_stall.py --preset base --saves 5

Both ways run in one process, interleaved round by round, after a compiling step; the table
gives medians over the rounds.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import tempfile
import time

import jax
import orbax.checkpoint as ocp

from jax_residual.train import checkpoint, data, loop, optim, step
from jax_residual.train.run_config import RunConfig


def timed_steps(train_step, state, batch, manager, saves: int, every: int) -> tuple[list[float], list[float], object]:
    """(plain step seconds, step + save seconds, state) over saves * every steps."""
    plain, saving = [], []
    for index in range(saves * every):
        tick = time.perf_counter()
        state, out = train_step(state, batch)
        jax.block_until_ready(out)
        if index % every == every - 1:
            checkpoint.save(manager, state, {"step": int(index + 1)})
            saving.append(time.perf_counter() - tick)
        else:
            plain.append(time.perf_counter() - tick)
    manager.wait_until_finished()
    return plain, saving, state


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--saves", type=int, default=4, help="saves per round")
    parser.add_argument("--every", type=int, default=5, help="steps per save")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    run = RunConfig(preset=args.preset, method="standard", output_dir=tempfile.mkdtemp())
    p = loop.plan(run, jax.devices()[:1])
    tx = optim.make_optimizer(run.lr, run.warmup_steps, run.schedule_steps, run.weight_decay, run.grad_clip)
    shardings, _ = step.state_shardings(p.mesh, p.cfg, tx, run.seq_len)
    state = step.init_state(step.init_params(p.cfg, 0, run.seq_len, shardings.params), tx, shardings)
    train_step = step.make_train_step(loop.LlamaForCausalLM(p.cfg, mesh=p.mesh), tx, shardings, p.mesh)
    batch = data.global_batch_array(data.train_batch(p.corpus.train, 0, 0, run.batch_size, run.seq_len, 1),
                                    step.stacked_batch_sharding(p.mesh), 1)
    state, _ = train_step(state, batch)  # compiles
    results = {True: ([], []), False: ([], [])}
    with tempfile.TemporaryDirectory() as folder:
        for round_ in range(args.rounds):
            for asynchronous in (True, False):
                options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True,
                                                       enable_async_checkpointing=asynchronous)
                directory = pathlib.Path(folder) / f"{asynchronous}-{round_}"
                with checkpoint.quiet_orbax():
                    manager = ocp.CheckpointManager(directory, options=options, item_names=("state", "meta"))
                plain, saving, state = timed_steps(train_step, state, batch, manager, args.saves, args.every)
                manager.close()
                results[asynchronous][0].extend(plain)
                results[asynchronous][1].extend(saving)
    params = sum(x.size for x in jax.tree.leaves(state.params))
    print(f"preset {args.preset} ({params / 1e6:.2f}M params, state {3 * params * 4 / 1e6:.0f} MB), "
          f"batch {run.batch_size} x {run.seq_len}, {jax.devices()[0].device_kind}")
    print("| save | plain step (ms) | step + save (ms) | stall (ms) | stall / step |\n|---|---|---|---|---|")
    for asynchronous, (plain, saving) in results.items():
        base, with_save = statistics.median(plain) * 1e3, statistics.median(saving) * 1e3
        print(f"| {'async' if asynchronous else 'sync'} | {base:.1f} | {with_save:.1f} | {with_save - base:.1f} | "
              f"{(with_save - base) / base:.2f} |")


if __name__ == "__main__":
    main()
