"""The corpus and the batches: bytes in, token windows out.

The corpus is read as bytes (vocabulary 256; tokenizer.py encodes it with other tokenizers).
Documents are joined with a NUL byte (`EOS`), which text never contains. The default corpus needs no download: the Python standard library's own
source files, read from the running interpreter, split into train/validation BY FILE.

Batch k is a pure function of (seed, k): `train_batch` draws its window starts from a
generator seeded with [seed, k], so a resumed run sees exactly the batches an uninterrupted
run would, whatever happened before, and every process computes the same global batch and
feeds only its own rows (`global_batch_array`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import pathlib
import sysconfig

import jax
import numpy as np

VOCAB_SIZE = 256
EOS = 0
VALIDATION_FRACTION = 0.05
SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


@dataclasses.dataclass(frozen=True)
class Corpus:
    """train, validation: token streams (uint8 bytes, or ids of a tokenizer.py tokenizer);
    description: where they came from; validation_tokens_per_byte: tokens of the validation
    stream per byte of its text (1 for bytes), for bits-per-byte."""

    train: np.ndarray
    validation: np.ndarray
    description: str
    validation_tokens_per_byte: float = 1.0


# ----------------------------------------------------------------------------- reading


def stdlib_root() -> pathlib.Path:
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def stdlib_sources(root: pathlib.Path) -> list[pathlib.Path]:
    """The standard library's *.py files under root, installed packages excluded, sorted."""
    return sorted(p for p in root.rglob("*.py")
                  if p.is_file() and not SKIPPED_DIRS & set(p.relative_to(root).parts[:-1]))


def folder_files(root: pathlib.Path) -> list[pathlib.Path]:
    """Every regular, non-hidden file under root, sorted."""
    return sorted(p for p in root.rglob("*")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts))


def validation_names(names: list[str], fraction: float) -> set[str]:
    """The ceil(fraction * n) names with the smallest SHA-256: a split by file that depends on
    nothing but the names (not on their order, nor on which other files exist)."""
    count = max(1, math.ceil(fraction * len(names))) if len(names) > 1 else 0
    return set(sorted(names, key=lambda n: hashlib.sha256(n.encode()).hexdigest())[:count])


def join_documents(documents: list[bytes]) -> np.ndarray:
    """uint8 [sum(len) + n]: every document followed by EOS."""
    return np.frombuffer(b"".join(d + bytes([EOS]) for d in documents), dtype=np.uint8)


def text_documents(files: list[pathlib.Path]) -> dict[pathlib.Path, bytes]:
    """The files' bytes, binary files (containing a NUL byte) left out."""
    contents = {f: f.read_bytes() for f in files}
    return {f: data for f, data in contents.items() if data and bytes([EOS]) not in data}


def split_files(files: list[pathlib.Path], root: pathlib.Path, description: str) -> Corpus:
    """Train/validation by file (see `validation_names`); raises if either side is empty."""
    documents = text_documents(files)
    names = {f: f.relative_to(root).as_posix() for f in documents}
    held_out = validation_names(sorted(names.values()), VALIDATION_FRACTION)
    if not held_out:
        raise ValueError(f"{description}: need at least 2 text files to split train/validation by file")
    train = [documents[f] for f in documents if names[f] not in held_out]
    validation = [documents[f] for f in documents if names[f] in held_out]
    return Corpus(join_documents(train), join_documents(validation),
                  f"{description}: {len(train)} train / {len(validation)} validation files")


@functools.lru_cache(maxsize=4)
def load_corpus(data: str | None) -> Corpus:
    """The default corpus (None), a folder (split by file) or one text file (its last 5% of
    bytes held out, as a single file cannot be split by file). Cached: a sweep reads it once."""
    if data is None:
        root = stdlib_root()
        files = stdlib_sources(root)
        if not files:
            raise ValueError(f"no standard-library sources under {root}; pass --data FILE_OR_FOLDER")
        return split_files(files, root, f"Python {sysconfig.get_python_version()} standard library at {root}")
    path = pathlib.Path(data)
    if path.is_dir():
        return split_files(folder_files(path), path, f"folder {path}")
    if not path.is_file():
        raise ValueError(f"--data {data}: no such file or folder")
    tokens = np.frombuffer(path.read_bytes(), dtype=np.uint8)
    cut = len(tokens) - max(1, int(len(tokens) * VALIDATION_FRACTION))
    return Corpus(tokens[:cut], tokens[cut:],
                  f"file {path}: first {cut} bytes train, last {len(tokens) - cut} validation")


def check_corpus(corpus: Corpus, seq_len: int):
    """Raise ValueError unless both streams hold at least one window of seq_len + 1 tokens."""
    for name in ("train", "validation"):
        size = len(getattr(corpus, name))
        if size < seq_len + 1:
            raise ValueError(f"{corpus.description}: the {name} split has {size} tokens, "
                             f"fewer than --seq-len + 1 = {seq_len + 1}")


# ----------------------------------------------------------------------------- batches


def train_batch(tokens: np.ndarray, seed: int, index: int, batch_size: int, seq_len: int,
                grad_accum: int) -> np.ndarray:
    """Batch `index`: int32 [grad_accum, batch_size / grad_accum, seq_len + 1], windows of the
    train stream at starts drawn from numpy's generator seeded with [seed, index]."""
    starts = np.random.default_rng([seed, index]).integers(0, len(tokens) - seq_len, batch_size)
    windows = tokens[starts[:, None] + np.arange(seq_len + 1)].astype(np.int32)
    return windows.reshape(grad_accum, batch_size // grad_accum, seq_len + 1)


def validation_batches(corpus: Corpus, count: int, batch_size: int, seq_len: int) -> np.ndarray:
    """What the training loop evaluates on: int32 [count, batch_size, seq_len + 1], windows of
    the held-out `corpus.validation` stream (never of `corpus.train`) at evenly spaced starts
    over the whole stream. The same every time."""
    tokens = corpus.validation
    starts = np.linspace(0, len(tokens) - seq_len - 1, count * batch_size).astype(np.int64)
    return tokens[starts[:, None] + np.arange(seq_len + 1)].astype(np.int32).reshape(count, batch_size, seq_len + 1)


def local_rows(sharding: jax.sharding.Sharding, shape: tuple[int, ...], axis: int) -> slice:
    """The rows along `axis` that this process's devices hold of an array of this shape."""
    index_map = sharding.addressable_devices_indices_map(shape)
    bounds = [index[axis].indices(shape[axis])[:2] for index in index_map.values()]
    return slice(min(b[0] for b in bounds), max(b[1] for b in bounds))


def global_batch_array(batch: np.ndarray, sharding: jax.sharding.Sharding, batch_axis: int) -> jax.Array:
    """The global batch as one array sharded by `sharding`; this process feeds only its rows."""
    rows = local_rows(sharding, batch.shape, batch_axis)
    local = np.take(batch, np.arange(batch.shape[batch_axis])[rows], axis=batch_axis)
    return jax.make_array_from_process_local_data(sharding, local, batch.shape)
