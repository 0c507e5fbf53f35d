"""`python -m jax_residual.prepare SOURCE OUT_DIR --tokenizer SPEC`: a corpus tokenized once into
token-id shards (jax_residual/data/shards.py) that training streams (`--data OUT_DIR`).

SOURCE: a text folder, a text file, .jsonl / .jsonl.gz, .parquet or a `datasets` save_to_disk
folder (jax_residual/data/sources.py). Each document goes to train, validation or test by a
hash of its text (`split_of`): the same document always lands in the same split, so adding
documents never moves old ones, and duplicates never straddle splits. SPEC: bytes, bpe:N (trained
on a sample of the train split's documents) or a tokenizer.json / HF folder (train/tokenizer.py).

Documents are read in order by this process and tokenized by `--workers` processes, a bounded
number of chunks in flight, so memory holds about a shard per split plus those chunks, never
the corpus. The folder is marked incomplete while it is written and meta.json comes last: an
interrupted prepare leaves no index, and rerunning it restarts cleanly; rerunning a finished
one with the same settings does nothing. Bad input stops it with one line and exit status 2,
removing what it wrote.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import json
import multiprocessing
import os
import pathlib
import shutil
import sys
from collections.abc import Iterable, Iterator

import numpy as np
import tqdm

from jax_residual.command_line import OneLineParser
from jax_residual.data import shards, sources
from jax_residual.data import tokenizer as tokenizers

VALIDATION_FRACTION = 0.05
TEST_FRACTION = 0.05
SHARD_TOKENS = 1 << 24  # 32 MiB of uint16 ids
CHUNK_BYTES = 1 << 22  # text per worker task
BPE_SAMPLE_BYTES = 1 << 27  # train-split text a bpe:N learns from
TASKS_PER_WORKER = 2  # chunks in flight per worker


@dataclasses.dataclass(frozen=True)
class Settings:
    """What a prepared folder is made from; a rerun with equal settings reuses the folder."""

    source: str  # absolute path, or "stdlib"
    tokenizer: str
    text_field: str = "text"
    validation_fraction: float = VALIDATION_FRACTION
    test_fraction: float = TEST_FRACTION
    shard_tokens: int = SHARD_TOKENS
    bpe_sample_bytes: int = BPE_SAMPLE_BYTES


def source_name(source: str | None) -> str:
    return "stdlib" if source is None else str(pathlib.Path(source).absolute())


# ----------------------------------------------------------------------------- splits and encoding


def split_of(document: bytes, validation_fraction: float, test_fraction: float) -> str:
    """'validation', 'test' or 'train', from the first 8 bytes of the document's SHA-256 read as
    a fraction u in [0, 1): validation if u < validation_fraction, test if below the sum."""
    u = int.from_bytes(hashlib.sha256(document).digest()[:8], "big") / 2**64
    return "validation" if u < validation_fraction else "test" if u < validation_fraction + test_fraction else "train"


@dataclasses.dataclass
class Encoded:
    """One split's share of a chunk: ids [tokens] (each document followed by the separator),
    its documents and bytes of text (UTF-8 plus one per separator)."""

    ids: np.ndarray
    documents: int
    bytes: int


_WORKER: dict = {}  # the tokenizer and fractions of this (worker) process, set by `start_worker`


def start_worker(tokenizer_json: str | None, eos_id: int, fractions: tuple[float, float]):
    from tokenizers import Tokenizer

    _WORKER.update(tokenizer=tokenizer_json and Tokenizer.from_str(tokenizer_json), eos_id=eos_id, fractions=fractions)


def encode_documents(texts: list[str], tokenizer, eos_id: int) -> np.ndarray:
    """uint32 [sum of tokens + len(texts)]: every text's ids followed by eos_id (bytes: its UTF-8)."""
    if not texts:
        return np.zeros(0, np.uint32)
    ids = ([np.frombuffer(t.encode(), np.uint8) for t in texts] if tokenizer is None else
           [np.asarray(e.ids, np.uint32) for e in tokenizer.encode_batch(texts, add_special_tokens=False)])
    eos = np.asarray([eos_id], np.uint32)
    return np.concatenate([part for piece in ids for part in (piece.astype(np.uint32), eos)])


def encode_chunk(texts: list[str]) -> dict[str, Encoded]:
    """A chunk of documents split (`split_of`) and encoded with this process's tokenizer."""
    encoded = [t.encode() for t in texts]
    by_split = collections.defaultdict(list)
    for text, raw in zip(texts, encoded):
        by_split[split_of(raw, *_WORKER["fractions"])].append((text, len(raw) + 1))
    return {split: Encoded(encode_documents([t for t, _ in docs], _WORKER["tokenizer"], _WORKER["eos_id"]),
                           len(docs), sum(n for _, n in docs))
            for split, docs in by_split.items()}


def chunks(documents: Iterable[str], chunk_bytes: int) -> Iterator[list[str]]:
    """Consecutive documents grouped into lists of about `chunk_bytes` characters."""
    chunk, size = [], 0
    for document in documents:
        chunk.append(document)
        size += len(document)
        if size >= chunk_bytes:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def bounded_imap(pool, function, items: Iterable, in_flight: int) -> Iterator:
    """pool.imap's ordered results, with at most `in_flight` tasks submitted ahead (imap itself
    reads its whole input ahead, which would hold the corpus in memory)."""
    pending = collections.deque()
    for item in items:
        pending.append(pool.apply_async(function, (item,)))
        if len(pending) >= in_flight:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def encoded_chunks(documents: Iterable[str], run_tokenizer: tokenizers.RunTokenizer, fractions, workers: int):
    """encode_chunk of every chunk, in order: in this process for one worker, else in a pool."""
    json_text = None if run_tokenizer.tokenizer is None else run_tokenizer.tokenizer.to_str()
    setup = (json_text, run_tokenizer.eos_id, fractions)
    if workers == 1:
        start_worker(*setup)
        yield from map(encode_chunk, chunks(documents, CHUNK_BYTES))
        return
    with multiprocessing.get_context("spawn").Pool(workers, start_worker, setup) as pool:
        yield from bounded_imap(pool, encode_chunk, chunks(documents, CHUNK_BYTES), TASKS_PER_WORKER * workers)


# ----------------------------------------------------------------------------- the tokenizer


def train_documents(source: sources.Source, settings: Settings, warn) -> Iterator[str]:
    """The first train-split documents of the source, about `bpe_sample_bytes` of text."""
    total = 0
    for document in source.documents(warn):
        raw = document.encode()
        if split_of(raw, settings.validation_fraction, settings.test_fraction) == "train":
            yield document
            total += len(raw)
            if total >= settings.bpe_sample_bytes:
                return


def make_tokenizer(source: sources.Source, settings: Settings, log, warn) -> tokenizers.RunTokenizer:
    """bytes, a bpe:N trained on `train_documents` (saying so, with the tokenizers library's
    progress bars on a terminal), or a path's."""
    spec = settings.tokenizer
    if spec == tokenizers.BYTES:
        return tokenizers.BYTE_TOKENIZER
    if not spec.startswith("bpe:"):
        return tokenizers.path_tokenizer(spec)
    log(f"training the {spec} tokenizer on up to {settings.bpe_sample_bytes / 2**20:.0f} MiB of the train split's "
        "documents ...")
    sample = list(train_documents(source, settings, warn))
    if not sample:
        raise sources.SourceError(f"{source.description}: no train-split documents to train {spec} on")
    trained = tokenizers.train_bpe(sample, tokenizers.spec_vocab_size(spec), progress=sys.stderr.isatty())
    return tokenizers.bpe_tokenizer(trained, spec)


# ----------------------------------------------------------------------------- the folder


def start_folder(out: pathlib.Path, settings: Settings, log) -> bool:
    """Ready `out` for writing (False: it already holds these settings' corpus). An
    interrupted prepare (its marker, no meta.json) is removed and restarted; anything else
    in the way is a ValueError."""
    wanted = dataclasses.asdict(settings)
    if shards.is_prepared(out):
        held = shards.read_meta(out).get("settings")
        if held == wanted:
            return False
        changed = ", ".join(f"{k}: {held.get(k)!r} -> {v!r}" for k, v in wanted.items() if (held or {}).get(k) != v)
        raise ValueError(f"{out} holds a corpus prepared with other settings ({changed}); pass another OUT_DIR")
    if (out / shards.INCOMPLETE_MARKER).exists():
        log(f"restarting the interrupted prepare in {out}")
        shutil.rmtree(out)
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} exists and is not a prepared corpus; pass a new or empty OUT_DIR")
    out.mkdir(parents=True, exist_ok=True)
    (out / shards.INCOMPLETE_MARKER).write_text(json.dumps(wanted))
    return True


def split_summary(writer: shards.ShardWriter, documents: int, byte_count: int, max_id: int) -> dict:
    shard_list = writer.close()
    return {"documents": documents, "tokens": sum(s["tokens"] for s in shard_list), "bytes": byte_count,
            "max_id": max_id, "shards": shard_list}


def write_shards(out: pathlib.Path, source: sources.Source, run_tokenizer: tokenizers.RunTokenizer,
                 settings: Settings, workers: int, warn) -> dict[str, dict]:
    """Tokenize the source into out/<split>/ shards; the `splits` entry of meta.json."""
    dtype = shards.token_dtype(run_tokenizer.vocab_size)
    writers = {split: shards.ShardWriter(out, split, dtype, settings.shard_tokens) for split in shards.SPLITS}
    counts = {split: [0, 0, -1] for split in shards.SPLITS}  # documents, bytes, largest id
    fractions = (settings.validation_fraction, settings.test_fraction)
    with tqdm.tqdm(desc="prepare", unit="tok", unit_scale=True, dynamic_ncols=True, disable=None) as bar:
        for chunk in encoded_chunks(source.documents(warn), run_tokenizer, fractions, workers):
            for split, encoded in chunk.items():
                writers[split].add(encoded.ids)
                count = counts[split]
                count[0], count[1] = count[0] + encoded.documents, count[1] + encoded.bytes
                count[2] = max(count[2], int(encoded.ids.max()))
                bar.update(len(encoded.ids))
            bar.set_postfix(docs=sum(c[0] for c in counts.values()), refresh=False)
    return {split: split_summary(writers[split], *counts[split]) for split in shards.SPLITS}


def check_splits(splits: dict[str, dict], settings: Settings, description: str):
    """SourceError for an empty source, or an empty train or validation split."""
    total = sum(s["documents"] for s in splits.values())
    if not total:
        raise sources.SourceError(f"{description}: no documents (an empty source, or no text in it)")
    for name, fraction in (("train", 1 - settings.validation_fraction - settings.test_fraction),
                           ("validation", settings.validation_fraction)):
        if not splits[name]["documents"]:
            raise sources.SourceError(f"{description}: the {name} split is empty ({total} documents, {name} fraction "
                                      f"{fraction:g}); add documents or change --validation-fraction")


def prepare(source_arg: str | None, out: pathlib.Path, settings: Settings, workers: int = 1, log=print,
            warn=None) -> pathlib.Path:
    """Prepare `source_arg` (None: the standard library) into `out` as `settings` say; `out`."""
    warn = warn or (lambda line: print(f"warning: {line}", file=sys.stderr))
    source = sources.open_source(source_arg, settings.text_field)
    if not start_folder(out, settings, log):
        log(f"{out} already holds this corpus, prepared with the same settings")
        return out
    skipped = {}  # the source's skipped files, once each (a bpe:N reads some twice)
    try:
        run_tokenizer = make_tokenizer(source, settings, log, skipped.setdefault)
        splits = write_shards(out, source, run_tokenizer, settings, workers, skipped.setdefault)
        check_splits(splits, settings, source.description)
    except (ValueError, OSError):  # bad input: nothing half-written is left behind
        shutil.rmtree(out)
        raise
    if skipped:
        warn(f"skipped {len(skipped)} file(s) that are not text: {'; '.join(list(skipped)[:3])}"
             f"{' ...' if len(skipped) > 3 else ''}")
    if run_tokenizer.tokenizer is not None:
        run_tokenizer.tokenizer.save(str(out / tokenizers.TOKENIZER_FILE))
    meta = {"format": shards.FORMAT, "source": source.description, "settings": dataclasses.asdict(settings),
            "tokenizer": {"name": run_tokenizer.name, "vocab_size": run_tokenizer.vocab_size,
                          "eos_id": run_tokenizer.eos_id, "fingerprint": run_tokenizer.fingerprint},
            "dtype": shards.token_dtype(run_tokenizer.vocab_size).name,
            "separator": {"id": run_tokenizer.eos_id, "placement": "after every document"},
            "splits": splits}
    shards.write_atomically(out / shards.META_FILE, json.dumps(meta, indent=1).encode())
    (out / shards.INCOMPLETE_MARKER).unlink()
    log(f"prepared {out}: " + ", ".join(f"{name} {s['documents']:,} documents / {s['tokens']:,} tokens"
                                        for name, s in splits.items()))
    return out


def prepared_tokenizer(corpus: shards.PreparedCorpus) -> tokenizers.RunTokenizer:
    """The tokenizer a prepared corpus was made with (its tokenizer.json, or bytes)."""
    info = corpus.meta["tokenizer"]
    if info["name"] == tokenizers.BYTES:
        return tokenizers.BYTE_TOKENIZER
    tokenizer = tokenizers.read_tokenizer(corpus.folder / tokenizers.TOKENIZER_FILE)
    return tokenizers.RunTokenizer(info["name"], info["vocab_size"], info["eos_id"], tokenizer)


# ----------------------------------------------------------------------------- command line


def fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def tokenizer_flag(text: str) -> str:
    try:
        return tokenizers.parse_spec(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="python -m jax_residual.prepare", description=__doc__.split("\n\n")[0],
        epilog="Exit status: 0 prepared (or already prepared), 2 bad input (one line, nothing left half-written).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("source", metavar="SOURCE", help="text folder, text file (one document per paragraph), "
                                                         ".jsonl/.jsonl.gz, .parquet or a datasets save_to_disk folder")
    parser.add_argument("out", metavar="OUT_DIR", type=pathlib.Path, help="the prepared folder (new or empty)")
    parser.add_argument("--tokenizer", type=tokenizer_flag, default=tokenizers.BYTES, metavar="SPEC",
                        help="bytes, bpe:N (trained on a sample of the train split) or a tokenizer.json / HF folder")
    parser.add_argument("--text-field", default="text", help="the text field of jsonl records, parquet and datasets rows")
    parser.add_argument("--workers", type=positive, default=min(8, os.cpu_count() or 1),
                        help="tokenizing processes")
    parser.add_argument("--validation-fraction", type=fraction, default=VALIDATION_FRACTION,
                        help="share of the documents (by hash) held out for evaluation during training")
    parser.add_argument("--test-fraction", type=fraction, default=TEST_FRACTION,
                        help="share of the documents (by hash) reserved for studies; training never reads it")
    parser.add_argument("--shard-tokens", type=positive, default=SHARD_TOKENS, help="token ids per shard file")
    parser.add_argument("--bpe-sample-bytes", type=positive, default=BPE_SAMPLE_BYTES,
                        help="text of the train split a bpe:N tokenizer learns from")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.validation_fraction + args.test_fraction >= 1:
        parser.error("--validation-fraction + --test-fraction must be < 1")
    settings = Settings(source_name(args.source), args.tokenizer, args.text_field, args.validation_fraction,
                        args.test_fraction, args.shard_tokens, args.bpe_sample_bytes)
    try:
        prepare(args.source, args.out, settings, args.workers)
    except (ValueError, OSError) as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
