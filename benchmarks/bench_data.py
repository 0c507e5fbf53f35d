"""The data path, measured (not a test): prepare throughput, the grain input pipeline against the
train step, and the trainer's peak RSS on a large token corpus.

    python benchmarks/bench_data.py --text-mb 1024 --tokens-gb 4 --workdir /tmp/bench_data

1. `prepare`: a synthetic jsonl corpus of --text-mb MB (random words, ~3 KB documents) prepared
   with --tokenizer (bytes) by 1 and by --workers worker processes: MB/s, and MB/s per worker.
   With several sizes (--text-mb 256,1024: the smaller ones are prefixes of the largest) also
   the marginal rate between consecutive sizes, (MB_b - MB_a) / (s_b - s_a): the steady-state
   rate without the fixed costs (starting the workers, opening the source).
2. `stream`: the grain pipeline (data.train_batches) over the train split prepared from the
   largest corpus, in batches/s and MB/s of token ids (int32, as the step receives them) at the
   default batch and at --stream-batch, against the same windows read without grain
   (data.train_batch + data.batch_array in a loop, one thread): the baseline of the same run.
3. `steps`: the pipeline alone in batches/s, and the train step's time fed from it vs fed one
   constant batch, for the --presets at the default batch and sequence length.
4. `rss`: peak RSS (ru_maxrss) of `train_tpu_gpu.py` training --rss-steps steps on a prepared
   corpus of --tokens-gb GB of token ids, and on the corpus prepared in part 1.

--parts picks parts 2-4 (all by default; part 1 always runs). The work folder is deleted at
the end. Prints one JSON object.
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
from jax_residual.train.run_config import RunConfig  # noqa: E402

WORDS = np.array("the of and to in is that for it as with was on be by this are from at or an which".split())


def synthetic_jsonl(path: pathlib.Path, megabytes: int, seed: int = 0):
    """~`megabytes` MB of {"text": ...} records of 800 random words each (~4 KB; the words need no
    JSON escaping)."""
    rng, words = np.random.default_rng(seed), WORDS.tolist()
    written = 0
    with path.open("w") as file:
        while written < megabytes * 1e6:
            block = "".join('{"text": "' + " ".join(map(words.__getitem__, row)) + '"}\n'
                            for row in rng.integers(0, len(words), (256, 800)).tolist())
            file.write(block)
            written += len(block)


def prefix_copy(source: pathlib.Path, target: pathlib.Path, megabytes: int):
    """The first whole lines of `source` holding at least `megabytes` MB (a smaller corpus of the
    same documents)."""
    with source.open("rb") as lines, target.open("wb") as out:
        for line in lines:
            out.write(line)
            if out.tell() >= megabytes * 1e6:
                return


def time_prepare(source: pathlib.Path, out: pathlib.Path, workers: int, tokenizer: str) -> float:
    shutil.rmtree(out, ignore_errors=True)
    tick = time.perf_counter()
    prepare.prepare(str(source), out, prepare.Settings(prepare.source_name(str(source)), tokenizer), workers,
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


def stream_rates(folder: pathlib.Path, batch_size: int, seq_len: int, batches: int) -> dict:
    """batches/s and MB/s of int32 token ids of the grain pipeline over `folder`'s train split, and
    of the same windows read and put on the device in a loop without grain (one thread)."""
    import jax

    from jax_residual.train import data, step
    from jax_residual.sharding import make_mesh

    tokens = shards.open_prepared(folder).train
    sharding = step.stacked_batch_sharding(make_mesh(None))
    shape = (1, batch_size, seq_len + 1)
    megabytes = batch_size * (seq_len + 1) * 4 / 1e6

    def rate(feed) -> float:
        tick = time.perf_counter()
        for batch in feed:
            jax.block_until_ready(batch)
        return batches / (time.perf_counter() - tick)

    grain_per_s = rate(data.train_batches(tokens, 0, 0, batches, batch_size, seq_len, 1, sharding))
    direct_per_s = rate(data.batch_array(data.train_batch(tokens, 0, index, batch_size, seq_len, 1), sharding, shape)
                        for index in range(batches))
    return {"batch": [batch_size, seq_len + 1], "train_tokens": len(tokens), "batches": batches,
            "grain_batches_per_s": grain_per_s, "grain_mb_per_s": grain_per_s * megabytes,
            "direct_batches_per_s": direct_per_s, "direct_mb_per_s": direct_per_s * megabytes,
            "grain_over_direct": grain_per_s / direct_per_s}


def step_times(folder: pathlib.Path, preset: str, steps: int) -> dict:
    """ms per train step fed by the grain pipeline vs one constant batch, and batches/s of the
    pipeline alone."""
    import jax

    from jax_residual import LlamaForCausalLM
    from jax_residual.train import data, loop, optim, step

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


PARTS = ("stream", "steps", "rss")  # after part 1, prepare, which they read


def prepare_part(work: pathlib.Path, sizes: list[int], workers: int, tokenizer: str) -> tuple[dict, pathlib.Path]:
    """Part 1; also the folder prepared (1 worker) from the largest corpus, for the other parts."""
    largest = work / f"corpus-{sizes[-1]}.jsonl"
    synthetic_jsonl(largest, sizes[-1])
    result, previous = {}, None
    for size in sizes:
        source = largest if size == sizes[-1] else work / f"corpus-{size}.jsonl"
        if source != largest:
            prefix_copy(largest, source, size)
        megabytes = source.stat().st_size / 1e6
        runs = {}
        for count in sorted({1, workers}):
            seconds = time_prepare(source, work / f"prepared-{count}", count, tokenizer)
            runs[str(count)] = {"seconds": seconds, "mb_per_s": megabytes / seconds,
                                "mb_per_s_per_worker": megabytes / seconds / count}
            if previous:
                done, before = previous["workers"][str(count)]["seconds"], previous["text_mb"]
                runs[str(count)]["marginal_mb_per_s"] = (megabytes - before) / (seconds - done)
            if count != 1 or size != sizes[-1]:
                shutil.rmtree(work / f"prepared-{count}")
        if source != largest:
            source.unlink()
        previous = {"text_mb": megabytes, "workers": runs}
        result[f"{size}MB"] = previous
    largest.unlink()
    return result, work / "prepared-1"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=pathlib.Path, default=pathlib.Path("/tmp/bench_data"))
    parser.add_argument("--text-mb", default="1024", help="corpus sizes in MB, comma-separated, ascending")
    parser.add_argument("--tokens-gb", type=float, default=4.0)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--tokenizer", default="bytes", help="prepare's SPEC (a tokenizer.json times encoding only)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of: {', '.join(PARTS)}")
    parser.add_argument("--stream-batches", type=int, default=1000, help="batches read per stream measurement")
    parser.add_argument("--stream-batch", default="64x1024", help="a larger batch for the stream part, BxS")
    parser.add_argument("--steps", type=int, default=10, help="timed train steps per feed and preset")
    parser.add_argument("--rss-steps", type=int, default=20)
    parser.add_argument("--presets", default="small,base")
    args = parser.parse_args()
    sizes, parts = [int(size) for size in args.text_mb.split(",")], [p for p in args.parts.split(",") if p]
    if sizes != sorted(sizes) or not set(parts) <= set(PARTS):
        parser.error(f"--text-mb must be ascending, --parts of {PARTS}; got {args.text_mb!r}, {args.parts!r}")
    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        prepared_sizes, prepared = prepare_part(work, sizes, args.workers, args.tokenizer)
        result = {"prepare": prepared_sizes}
        if "stream" in parts:
            big_batch, big_seq = (int(n) for n in args.stream_batch.split("x"))
            default = RunConfig()
            result["stream"] = [stream_rates(prepared, b, s, args.stream_batches)
                                for b, s in ((default.batch_size, default.seq_len), (big_batch, big_seq))]
        if "rss" in parts:
            result["rss_mb_prepared_corpus"] = trainer_rss_mb(prepared, args.rss_steps)
            token_corpus(work / "tokens", args.tokens_gb)
            result["tokens_gb"] = args.tokens_gb
            result["rss_mb_large_corpus"] = trainer_rss_mb(work / "tokens", args.rss_steps)
        if "steps" in parts:
            result["steps"] = [step_times(prepared, preset, args.steps) for preset in args.presets.split(",")]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
