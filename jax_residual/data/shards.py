"""A prepared corpus on disk: token-id shards per split and their index, meta.json.

    OUT_DIR/meta.json          the index (written last, atomically: a folder without it is not
                               a prepared corpus)
    OUT_DIR/tokenizer.json     the tokenizer (not for bytes)
    OUT_DIR/<split>/NNNNN.bin  split in train, validation, test: raw token ids of `dtype`
                               (uint16 where the vocabulary fits, else uint32), every shard
                               `shard_tokens` long but the split's last

A split's token stream is the concatenation of its shards: its documents in source order, each
followed by the separator id (`meta["separator"]`). meta.json records per split the documents,
tokens, bytes of text (UTF-8, one per separator: bytes per token for bits per byte), the
largest id, and per shard its file, tokens and SHA-256. `open_prepared` checks every shard's
size and checksum against it.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import json
import os
import pathlib

import numpy as np

META_FILE = "meta.json"
FORMAT = 1
SPLITS = ("train", "validation", "test")
INCOMPLETE_MARKER = ".incomplete"  # present while a prepare writes the folder


class CorpusError(ValueError):
    """A prepared folder that cannot be used as it is; the message is one line."""


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 where every id < vocab_size fits, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def write_atomically(path: pathlib.Path, data: bytes):
    """path holds `data` or what it held before, never a part of it."""
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(data)
    os.replace(partial, path)


class ShardWriter:
    """Token ids of one split in, shards of exactly `shard_tokens` ids out (the last one
    shorter) under folder/split/; holds at most one shard plus what was added last."""

    def __init__(self, folder: pathlib.Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.folder, self.split, self.dtype, self.shard_tokens = folder, split, dtype, shard_tokens
        self.pending: list[np.ndarray] = []
        self.pending_tokens = 0
        self.shards: list[dict] = []
        (folder / split).mkdir(parents=True, exist_ok=True)

    def add(self, ids: np.ndarray):
        self.pending.append(ids.astype(self.dtype, copy=False))
        self.pending_tokens += len(ids)
        while self.pending_tokens >= self.shard_tokens:
            self.flush(self.shard_tokens)

    def flush(self, count: int):
        """Write the first `count` pending ids as the next shard."""
        joined = np.concatenate(self.pending)
        shard, rest = joined[:count], joined[count:]
        name = f"{self.split}/{len(self.shards):05d}.bin"
        data = shard.tobytes()
        write_atomically(self.folder / name, data)
        self.shards.append({"file": name, "tokens": int(count), "sha256": hashlib.sha256(data).hexdigest()})
        self.pending, self.pending_tokens = [rest], len(rest)

    def close(self) -> list[dict]:
        """Write what is left; the shard list of meta.json."""
        if self.pending_tokens:
            self.flush(self.pending_tokens)
        return self.shards


class ShardedTokens:
    """One split's token stream, read from its shard files by positional reads (the page cache
    holds them; the process keeps only the windows it asked for)."""

    def __init__(self, paths: list[pathlib.Path], counts: list[int], dtype: np.dtype):
        self.files = [path.open("rb") for path in paths]
        self.counts = counts
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).tolist()  # [shards + 1] first id of each
        self.dtype = dtype

    def __len__(self) -> int:
        return self.offsets[-1]

    def read(self, start: int, length: int) -> np.ndarray:
        """ids [start, start + length) of the stream, crossing shard boundaries as needed."""
        if not 0 <= start <= start + length <= len(self):
            raise IndexError(f"ids [{start}, {start + length}) outside the stream of {len(self)}")
        pieces, shard = [], bisect.bisect_right(self.offsets, start) - 1
        while length > 0:
            offset = start - self.offsets[shard]
            take = min(length, self.counts[shard] - offset)
            raw = os.pread(self.files[shard].fileno(), take * self.dtype.itemsize, offset * self.dtype.itemsize)
            pieces.append(np.frombuffer(raw, self.dtype))
            start, length, shard = start + take, length - take, shard + 1
        return np.concatenate(pieces) if pieces else np.zeros(0, self.dtype)

    def windows(self, starts: np.ndarray, length: int) -> np.ndarray:
        """int32 [len(starts), length]: the windows of `length` ids at `starts`."""
        return np.stack([self.read(int(s), length) for s in starts]).astype(np.int32)

    def close(self):
        for file in self.files:
            file.close()


@dataclasses.dataclass(frozen=True)
class PreparedCorpus:
    """An opened prepared folder: its meta.json and one ShardedTokens per split."""

    folder: pathlib.Path
    meta: dict
    splits: dict[str, ShardedTokens]

    @property
    def train(self) -> ShardedTokens:
        return self.splits["train"]

    @property
    def validation(self) -> ShardedTokens:
        return self.splits["validation"]

    @property
    def test(self) -> ShardedTokens:
        """Reserved for studies: training and its evaluation never read it."""
        return self.splits["test"]

    @property
    def description(self) -> str:
        return f"{self.meta['source']}; tokenizer {self.meta['tokenizer']['name']}; prepared in {self.folder}"

    @property
    def validation_tokens_per_byte(self) -> float:
        """Tokens of the validation stream per byte of its text (1 for bytes), for bits per byte."""
        split = self.meta["splits"]["validation"]
        return split["tokens"] / split["bytes"]


def is_prepared(path: pathlib.Path) -> bool:
    return (path / META_FILE).is_file()


def read_meta(folder: pathlib.Path) -> dict:
    """meta.json of a prepared folder; CorpusError saying why it is not one."""
    if not is_prepared(folder):
        if (folder / INCOMPLETE_MARKER).exists():
            raise CorpusError(f"{folder}: an interrupted prepare (no {META_FILE}); rerun the same "
                              "`python -m jax_residual.prepare` command to restart it")
        raise CorpusError(f"{folder}: not a prepared corpus (no {META_FILE}); make one with "
                          "`python -m jax_residual.prepare SOURCE OUT_DIR`")
    try:
        meta = json.loads((folder / META_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CorpusError(f"{folder / META_FILE}: not JSON ({error})") from None
    if meta.get("format") != FORMAT:
        raise CorpusError(f"{folder / META_FILE}: format {meta.get('format')!r}, this version reads {FORMAT}")
    return meta


def checked_shard(folder: pathlib.Path, shard: dict, itemsize: int) -> pathlib.Path:
    """The shard's path once its size and SHA-256 match meta.json; CorpusError otherwise."""
    path = folder / shard["file"]
    expected = shard["tokens"] * itemsize
    if not path.is_file():
        raise CorpusError(f"shard {path} is missing; prepare the corpus again")
    if path.stat().st_size != expected:
        raise CorpusError(f"shard {path} is truncated or damaged: {path.stat().st_size} bytes, "
                          f"meta.json says {expected}; prepare the corpus again")
    with path.open("rb") as file:
        if hashlib.file_digest(file, "sha256").hexdigest() != shard["sha256"]:
            raise CorpusError(f"shard {path} does not match its SHA-256 in meta.json (damaged or changed); "
                              "prepare the corpus again")
    return path


def open_prepared(folder: pathlib.Path) -> PreparedCorpus:
    """The prepared corpus in `folder`, every shard checked (`checked_shard`)."""
    meta = read_meta(folder)
    dtype = np.dtype(meta["dtype"])
    splits = {}
    for name in SPLITS:
        shards = meta["splits"][name]["shards"]
        paths = [checked_shard(folder, shard, dtype.itemsize) for shard in shards]
        splits[name] = ShardedTokens(paths, [shard["tokens"] for shard in shards], dtype)
    return PreparedCorpus(folder, meta, splits)
