"""The batches: windows of a prepared corpus's token streams (jax_residual/data/shards.py),
streamed by a grain pipeline.

Batch k is a pure function of (seed, k): `train_batch` draws its window starts from numpy's
generator seeded with [seed, k], so a resumed run sees exactly the batches an uninterrupted run
would, whatever happened before. The grain pipeline (`train_batches`) is a MapDataset over the
batch indices, read ahead by background threads; every process draws the same starts and reads
only the windows of its own devices' rows (`local_rows`), then assembles the global array
(`batch_array`). Evaluation reads the validation stream only; the test split is left for studies.
"""

from __future__ import annotations

from collections.abc import Iterator

import grain
import jax
import numpy as np

PREFETCH_THREADS = 2
PREFETCH_BATCHES = 4


def window_starts(seed: int, index: int, batch_size: int, num_tokens: int, seq_len: int) -> np.ndarray:
    """int64 [batch_size]: the window starts of batch `index`, uniform in [0, num_tokens - seq_len)."""
    return np.random.default_rng([seed, index]).integers(0, num_tokens - seq_len, batch_size)


def train_batch(tokens, seed: int, index: int, batch_size: int, seq_len: int, grad_accum: int,
                rows: slice = slice(None)) -> np.ndarray:
    """Rows `rows` of batch `index`: int32 [grad_accum, rows of batch_size / grad_accum, seq_len + 1],
    windows of `tokens` (a ShardedTokens: len() and windows(starts, length)) at `window_starts`.
    Only those rows' windows are read."""
    starts = window_starts(seed, index, batch_size, len(tokens), seq_len).reshape(grad_accum, -1)[:, rows]
    return tokens.windows(starts.reshape(-1), seq_len + 1).reshape(*starts.shape, seq_len + 1)


def validation_batches(tokens, count: int, batch_size: int, seq_len: int) -> np.ndarray:
    """What the training loop evaluates on: int32 [count, batch_size, seq_len + 1], windows of the
    validation stream `tokens` at evenly spaced starts over the whole stream. The same every time."""
    starts = np.linspace(0, len(tokens) - seq_len - 1, count * batch_size).astype(np.int64)
    return tokens.windows(starts, seq_len + 1).reshape(count, batch_size, seq_len + 1)


def check_stream(tokens, name: str, seq_len: int, description: str):
    """ValueError unless the stream holds at least one window of seq_len + 1 tokens."""
    if len(tokens) < seq_len + 1:
        raise ValueError(f"{description}: the {name} split has {len(tokens)} tokens, "
                         f"fewer than --seq-len + 1 = {seq_len + 1}")


def local_rows(sharding: jax.sharding.Sharding, shape: tuple[int, ...], axis: int) -> slice:
    """The rows along `axis` that this process's devices hold of an array of this shape."""
    index_map = sharding.addressable_devices_indices_map(shape)
    bounds = [index[axis].indices(shape[axis])[:2] for index in index_map.values()]
    return slice(min(b[0] for b in bounds), max(b[1] for b in bounds))


def batch_array(local: np.ndarray, sharding: jax.sharding.Sharding, shape: tuple[int, ...]) -> jax.Array:
    """The global array of `shape` sharded by `sharding`, from this process's rows `local`."""
    return jax.make_array_from_process_local_data(sharding, local, shape)


def global_batch_array(batch: np.ndarray, sharding: jax.sharding.Sharding, batch_axis: int) -> jax.Array:
    """The global batch as one array sharded by `sharding`; this process feeds only its rows."""
    rows = local_rows(sharding, batch.shape, batch_axis)
    local = np.take(batch, np.arange(batch.shape[batch_axis])[rows], axis=batch_axis)
    return batch_array(local, sharding, batch.shape)


def train_batches(tokens, seed: int, start: int, stop: int, batch_size: int, seq_len: int, grad_accum: int,
                  sharding: jax.sharding.Sharding) -> Iterator[jax.Array]:
    """Batches start, ..., stop - 1 as global arrays [grad_accum, batch_size / grad_accum,
    seq_len + 1] sharded on axis 1: a grain MapDataset over the batch indices (`train_batch` of
    this process's rows), read ahead by PREFETCH_THREADS threads."""
    shape = (grad_accum, batch_size // grad_accum, seq_len + 1)
    rows = local_rows(sharding, shape, 1)
    dataset = grain.MapDataset.range(start, stop).map(
        lambda index: train_batch(tokens, seed, index, batch_size, seq_len, grad_accum, rows))
    options = grain.ReadOptions(num_threads=PREFETCH_THREADS, prefetch_buffer_size=PREFETCH_BATCHES)
    return (batch_array(local, sharding, shape) for local in dataset.to_iter_dataset(options))
