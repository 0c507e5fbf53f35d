"""Evaluate a training run on documents: `python -m jax_residual.evaluate RUN_DIR [--data SOURCE] [--split SPLIT]`.

Prints (and with --output writes) one JSON object: the loss in nats per token, the perplexity
exp(loss) and the bits per byte of the run's checkpoint (the newest readable, or --step N) on
the documents of SOURCE, each scored as lm-evaluation-harness's `loglikelihood_rolling` scores
it on the exported folder (`python -m jax_residual.export`):

* a document is encoded with the run's tokenizer as training encoded it (no BOS) and prefixed
  with the document separator (EOS: lm-eval's prefix token, the folder having no BOS);
* it is cut into `rolling_windows` of at most `--max-length` tokens (default: the model's
  max_position_embeddings, the context lm-eval reads from config.json), every token predicted
  exactly once, from the whole window before it;
* bits per byte = total NLL in nats / (UTF-8 bytes of the documents' text * ln 2), as lm-eval's
  `bits_per_byte`.

The windows run in JAX on the run's mesh (`--mesh` for another), `--batch-size` windows at a
time, with a progress bar. Sources (`load_documents`): whatever `prepare` reads (text, jsonl,
parquet, `datasets` folders; without --data the default corpus), split by document as `prepare`
splits it (`--split test`: the documents no training run reads). Bad paths or settings: one line
on stderr, exit status 2.
"""

from __future__ import annotations

import json
import math
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from jax.sharding import NamedSharding, PartitionSpec

from jax_residual import sharding
from jax_residual.command_line import OneLineParser
from jax_residual.export import read_run, restore_params
from jax_residual.model import LlamaForCausalLM
from jax_residual.sample import TextCodec
from jax_residual.train.step import token_losses
from jax_residual import prepare
from jax_residual.data import shards, sources

SPLITS = ("test", "validation", "train", "all")
DEFAULT_BATCH_SIZE = 8


# ----------------------------------------------------------------------------- documents


def load_documents(source: str | None, split: str, text_field: str = "text") -> list[str]:
    """The documents of `split` of a raw source, read as `prepare` reads it (data/sources.py:
    None = the default corpus, a text file (one document per paragraph) or folder, a .jsonl /
    .jsonl.gz or .parquet with `text_field`, a `datasets` folder) and split as `prepare` splits
    it, by the hash of each document at the default fractions (`prepare.split_of`): "test" is the
    split no training run or selection reads, "validation" what training evaluates on, "all"
    every document."""
    if split not in SPLITS:
        raise ValueError(f"--split {split!r}: expected one of {', '.join(SPLITS)}")
    if source is not None and shards.is_prepared(pathlib.Path(source)):
        raise ValueError(f"--data {source} is a prepared folder of token ids: pass the source it was prepared from "
                         f"(its meta.json names it), whose documents' text gives the bytes of bits per byte")
    documents = sources.open_source(source, text_field).documents(lambda line: print(f"warning: {line}", file=sys.stderr))
    fractions = (prepare.VALIDATION_FRACTION, prepare.TEST_FRACTION)
    return [text for text in documents if split == "all" or prepare.split_of(text.encode(), *fractions) == split]


# ----------------------------------------------------------------------------- windows


def rolling_windows(num_tokens: int, max_length: int) -> list[tuple[int, int, int]]:
    """lm-eval's rolling loglikelihood windows (`get_rolling_token_windows` with context_len 1,
    then `make_disjoint_window`) of a document of `num_tokens` tokens, in the sequence
    s = [prefix] + tokens: (start, stop, scored) with s[start:stop - 1] the model's input (at
    most max_length tokens), s[start + 1:stop] the tokens it predicts, of which the last
    `scored` count. Every token of the document is counted exactly once."""
    first = min(max_length, num_tokens)
    windows = [(0, first + 1, first)] if num_tokens else []
    predicted = first
    while predicted < num_tokens:
        scored = min(num_tokens - predicted, max_length)
        end = predicted + scored  # s[end] is the last token predicted
        windows.append((end - max_length, end + 1, scored))
        predicted = end
    return windows


def window_rows(sequence: list[int], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """The rolling windows of s = `sequence` ([prefix] + tokens) as rows: tokens int32
    [w, max_length + 1] (s[start:stop], zeros after) and the weights float32 [w, max_length]
    of `token_losses`' positions (1 on the scored predictions, 0 elsewhere)."""
    windows = rolling_windows(len(sequence) - 1, max_length)
    tokens = np.zeros((len(windows), max_length + 1), np.int32)
    weights = np.zeros((len(windows), max_length), np.float32)
    for row, (start, stop, scored) in enumerate(windows):
        tokens[row, :stop - start] = sequence[start:stop]
        weights[row, stop - start - 1 - scored:stop - start - 1] = 1.0
    return tokens, weights


def padded(rows: np.ndarray, multiple: int) -> np.ndarray:
    """rows [n, ...] followed by zero rows up to a multiple of `multiple`."""
    return np.concatenate([rows, np.zeros((-len(rows) % multiple, *rows.shape[1:]), rows.dtype)])


# ----------------------------------------------------------------------------- scoring


def make_scorer(model, param_shardings, mesh):
    """jit(params, tokens int32 [b, s + 1], weights float32 [b, s]) -> float32 [b]: per row, the
    weighted sum of the next-token NLL (nats), rows split over the mesh's batch axes."""
    rows = sharding.batch_sharding(mesh)
    rows_only = NamedSharding(rows.mesh, PartitionSpec(rows.spec[0]))

    def score(params, tokens, weights):
        return jnp.sum(token_losses(params, model, tokens) * weights, axis=1)

    return jax.jit(score, in_shardings=(param_shardings, rows, rows), out_shardings=rows_only)


def total_nll(score, params, tokens: np.ndarray, weights: np.ndarray, batch_size: int, progress: bool) -> float:
    """Sum over every row of `score`'s NLL (float64 on the host), `batch_size` rows at a time."""
    tokens, weights = padded(tokens, batch_size), padded(weights, batch_size)
    total = 0.0
    for first in tqdm.trange(0, len(tokens), batch_size, desc="evaluate", unit="batch", disable=not progress):
        rows = slice(first, first + batch_size)
        total += float(np.sum(np.asarray(score(params, tokens[rows], weights[rows]), np.float64)))
    return total


def summary(nll: float, num_tokens: int, num_bytes: int) -> dict:
    """loss (nats/token), perplexity (per token) and bits per byte of a total NLL in nats."""
    loss = nll / num_tokens
    return {"loss": loss, "perplexity": math.exp(loss), "bits_per_byte": nll / (num_bytes * math.log(2)),
            "tokens": num_tokens, "bytes": num_bytes}


def run_mesh(spec: str | None, devices) -> jax.sharding.Mesh:
    """The mesh `spec` ('data=4,tensor=2'; None: data over every device) on the first devices it needs."""
    shape = sharding.parse_mesh_shape(spec or f"data={len(devices)}")
    size = math.prod(shape.values())
    if size > len(devices):
        raise ValueError(f"mesh {spec} needs {size} devices, {len(devices)} are available: pass --mesh")
    return sharding.make_mesh(shape, devices[:size])


def evaluate_run(run_dir, texts: list[str], *, max_length: int | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
                 mesh_spec: str | None = None, at_step: int | None = None, progress: bool = True, warn=print) -> dict:
    """`summary` of the run in `run_dir` (checkpoint `at_step`, default the newest readable) on
    the documents `texts`, each scored in `rolling_windows` of `max_length` tokens (default: the
    model's max_position_embeddings) on the mesh `mesh_spec` (default: the run's)."""
    return evaluate_splits(run_dir, {"documents": texts}, max_length=max_length, batch_size=batch_size,
                           mesh_spec=mesh_spec, at_step=at_step, progress=progress, warn=warn)["documents"]


def evaluate_splits(run_dir, texts: dict[str, list[str]], *, max_length: int | None = None,
                    batch_size: int = DEFAULT_BATCH_SIZE, mesh_spec: str | None = None, at_step: int | None = None,
                    progress: bool = True, warn=print) -> dict[str, dict]:
    """name -> `evaluate_run`'s result on each list of documents of `texts` (e.g. validation and
    test), the checkpoint restored and the scorer compiled once."""
    if not all(texts.values()):
        raise ValueError(f"no documents to evaluate in {[name for name, docs in texts.items() if not docs]}")
    run_dir = pathlib.Path(run_dir)
    run, cfg, eos_id = read_run(run_dir)
    mesh = run_mesh(mesh_spec or run.mesh, jax.devices())
    rows_multiple = sharding.mesh_ways(mesh, "batch")
    if batch_size % rows_multiple:
        raise ValueError(f"--batch-size {batch_size} must be divisible by the mesh's "
                         f"{sharding.describe_ways('batch')} = {rows_multiple}")
    max_length = max_length or cfg.max_position_embeddings
    step, params = restore_params(run_dir, run, cfg, at_step, warn, mesh)
    codec = TextCodec.of_run(run_dir, eos_id)
    score = make_scorer(LlamaForCausalLM(cfg, mesh=mesh), jax.tree.map(lambda p: p.sharding, params), mesh)
    results = {}
    for name, documents in texts.items():
        encoded = [codec.encode(text) for text in documents]
        rows = [window_rows([eos_id, *ids], max_length) for ids in encoded]
        tokens, weights = (np.concatenate(parts) for parts in zip(*rows))
        nll = total_nll(score, params, tokens, weights, batch_size, progress)
        results[name] = {"run_dir": str(run_dir), "step": step, "method": cfg.residual_method,
                         "documents": len(documents), "max_length": max_length, "windows": len(tokens),
                         **summary(nll, sum(map(len, encoded)), sum(len(text.encode()) for text in documents))}
    return results


def main(argv=None) -> int:
    """Exit status: 0 evaluated, 2 bad arguments, paths or settings (one line on stderr)."""
    parser = OneLineParser(prog="python -m jax_residual.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a train_tpu_gpu.py output folder")
    parser.add_argument("--data", help="a source as prepare reads it: text file or folder, .jsonl, .parquet, datasets folder "
                                       "(default: the default corpus)")
    parser.add_argument("--split", default="validation", help=f"one of {', '.join(SPLITS)} (default: %(default)s, "
                                                              "what training evaluates on; test: what no run reads)")
    parser.add_argument("--max-length", type=int, help="window length in tokens (default: max_position_embeddings)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="windows per step")
    parser.add_argument("--mesh", help="e.g. data=4,tensor=2 (default: the run's mesh)")
    parser.add_argument("--step", type=int, help="evaluate this checkpoint (default: the newest readable one)")
    parser.add_argument("--output", help="also write the JSON object to this file")
    args = parser.parse_args(argv)
    try:
        texts = load_documents(args.data, args.split)
        result = evaluate_run(args.run_dir, texts, max_length=args.max_length, batch_size=args.batch_size,
                              mesh_spec=args.mesh, at_step=args.step, warn=lambda line: print(line, file=sys.stderr))
    except (ValueError, OSError) as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    text = json.dumps({"data": args.data, "split": args.split, **result}, indent=2)
    if args.output:
        pathlib.Path(args.output).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
