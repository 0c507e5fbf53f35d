"""The data path, measured (not a test): prepare throughput, the grain input pipeline against the
train step, and the trainer's peak RSS on a large token corpus.

    python benchmarks/bench_data.py --text-mb 1024 --tokens-gb 4 --workdir /tmp/bench_data

1. A synthetic jsonl corpus of --text-mb MB (random words, ~4 KB documents) prepared with bytes
   by 1 and by --workers worker processes: MB/s, and MB/s per worker.
2. The input pipeline alone (data.train_batches: windows of the prepared train split) in
   batches/s, and the train step's time fed from it vs fed one constant batch, for the default
   (small) and the base preset at the default batch and sequence length.
3. Peak RSS (ru_maxrss) of `train_tpu_gpu.py` training --rss-steps steps on a prepared corpus of
   --tokens-gb GB of token ids, and on the small prepared corpus of part 1, as subprocesses.

The work folder is deleted at the end. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jax_residual import prepare  # noqa: E402
from jax_residual.data import shards  # noqa: E402

WORDS = np.array("the of and to in is that for it as with was on be by this are from at or an which".split())


def synthetic_jsonl(path: pathlib.Path, megabytes: int, seed: int = 0):
    """~`megabytes` MB of {"text": ...} records of random words, ~4 KB each."""
    rng = np.random.default_rng(seed)
    written = 0
    with path.open("w") as file:
        while written < megabytes * 1e6:
            block = "\n".join(json.dumps({"text": " ".join(rng.choice(WORDS, 800))}) for _ in range(256)) + "\n"
            file.write(block)
            written += len(block)


def time_prepare(source: pathlib.Path, out: pathlib.Path, workers: int) -> float:
    shutil.rmtree(out, ignore_errors=True)
    tick = time.perf_counter()
    prepare.prepare(str(source), out, prepare.Settings(prepare.source_name(str(source)), "bytes"), workers,
                    log=lambda _: None)
    return time.perf_counter() - tick


def token_corpus(out: pathlib.Path, gigabytes: float, seed: int = 0):
    """A prepared folder of random uint16 ids, `gigabytes` GB in all (train; small validation/test)."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True)
    splits = {}
    for split, tokens in (("train", int(gigabytes * 1e9 / 2)), ("validation", 1 << 20), ("test", 1 << 20)):
        writer = shards.ShardWriter(out, split, np.dtype(np.uint16), prepare.SHARD_TOKENS)
        for left in range(tokens, 0, -prepare.SHARD_TOKENS):
            writer.add(rng.integers(1, 256, min(left, prepare.SHARD_TOKENS), dtype=np.uint16))
        listed = writer.close()
        splits[split] = {"documents": 1, "tokens": tokens, "bytes": tokens, "max_id": 255, "shards": listed}
    meta = {"format": shards.FORMAT, "source": f"random ids ({gigabytes} GB)", "settings": {},
            "tokenizer": {"name": "bytes", "vocab_size": 256, "eos_id": 0}, "dtype": "uint16",
            "separator": {"id": 0, "placement": "after every document"}, "splits": splits}
    (out / shards.META_FILE).write_text(json.dumps(meta))


def step_times(folder: pathlib.Path, preset: str, steps: int) -> dict:
    """ms per train step fed by the grain pipeline vs one constant batch, and batches/s of the
    pipeline alone."""
    import jax

    from jax_residual import LlamaForCausalLM
    from jax_residual.train import data, loop, optim, step
    from jax_residual.train.run_config import RunConfig

    run = RunConfig(preset=preset, data=str(folder), output_dir=str(folder.parent / f"run-{preset}"), steps=steps,
                    warmup_steps=0)
    p = loop.plan(run)
    tx = optim.make_optimizer(run.lr, run.warmup_steps, run.schedule_steps, run.weight_decay, run.grad_clip)
    shardings, _ = step.state_shardings(p.mesh, p.cfg, tx, run.seq_len)
    state = step.init_state(step.init_params(p.cfg, run.seed, run.seq_len, shardings.params), tx, shardings)
    train_step = step.make_train_step(LlamaForCausalLM(p.cfg, mesh=p.mesh), tx, shardings, p.mesh)
    sharding = step.stacked_batch_sharding(p.mesh)

    def batches():
        return data.train_batches(p.corpus.train, 0, 0, 10 * steps, run.batch_size, run.seq_len, 1, sharding)

    stream = batches()
    tick = time.perf_counter()
    for _ in range(10 * steps):
        jax.block_until_ready(next(stream))
    pipeline_per_s = 10 * steps / (time.perf_counter() - tick)

    def timed(feed) -> float:
        nonlocal state
        state, out = train_step(state, next(feed))  # compiles (first call), not timed
        jax.block_until_ready(out)
        tick = time.perf_counter()
        for _ in range(steps):
            state, out = train_step(state, next(feed))
            jax.block_until_ready(out)
        return (time.perf_counter() - tick) / steps * 1e3

    constant = next(batches())
    real_ms = timed(batches())
    constant_ms = timed(iter(lambda: constant, None))
    return {"preset": preset, "batch": [run.batch_size, run.seq_len], "pipeline_batches_per_s": pipeline_per_s,
            "step_ms_real_input": real_ms, "step_ms_constant_batch": constant_ms}


def trainer_rss_mb(folder: pathlib.Path, steps: int) -> float:
    """Peak RSS in MB of a train_tpu_gpu.py run of `steps` steps on the prepared `folder` (that
    child's own rusage, os.wait4)."""
    process = subprocess.Popen([sys.executable, str(ROOT / "train_tpu_gpu.py"), "--data", str(folder), "--steps",
                                str(steps), "--eval-every", str(steps), "--checkpoint-every", str(steps),
                                "--sample-tokens", "0", "--output-dir", str(folder.parent / f"rss-{folder.name}")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "JAX_PLATFORMS": "cpu"})
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise RuntimeError(f"the trainer on {folder} exited {process.returncode}")
    return usage.ru_maxrss / 1024


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=pathlib.Path, default=pathlib.Path("/tmp/bench_data"))
    parser.add_argument("--text-mb", type=int, default=1024)
    parser.add_argument("--tokens-gb", type=float, default=4.0)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--steps", type=int, default=10, help="timed train steps per feed and preset")
    parser.add_argument("--rss-steps", type=int, default=20)
    parser.add_argument("--presets", default="small,base")
    args = parser.parse_args()
    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        source = work / "corpus.jsonl"
        synthetic_jsonl(source, args.text_mb)
        megabytes = source.stat().st_size / 1e6
        prepare_runs = {workers: time_prepare(source, work / f"prepared-{workers}", workers)
                        for workers in sorted({1, args.workers})}
        result = {"text_mb": megabytes, "prepare": {
            str(w): {"seconds": s, "mb_per_s": megabytes / s, "mb_per_s_per_worker": megabytes / s / w}
            for w, s in prepare_runs.items()}}
        shutil.rmtree(work / f"prepared-{args.workers}", ignore_errors=True)
        small = work / "prepared-1"
        result["rss_mb_small_corpus"] = trainer_rss_mb(small, args.rss_steps)
        token_corpus(work / "tokens", args.tokens_gb)
        result["tokens_gb"] = args.tokens_gb
        result["rss_mb_large_corpus"] = trainer_rss_mb(work / "tokens", args.rss_steps)
        result["steps"] = [step_times(small, preset, args.steps) for preset in args.presets.split(",")]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
