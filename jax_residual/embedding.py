"""VocabEmbedding (docs/maths.md A2) and the vocabulary-parallel embedding over a device mesh (docs/maths.md A3).

Both look ids up with `functional.masked_lookup`, so an out-of-range id can never be clamped
to a real row: concrete (eager) ids outside [0, v) raise ValueError; traced ids (inside
`jax.jit`) cannot be checked and give an all-zero embedding row instead.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jax_residual.functional import check_token_ids, masked_lookup
from jax_residual.sharding import TENSOR_AXIS, place, placement_mesh

EMBEDDING_AXES = ("vocab", "embed")


def normal_table(key, shape, mean: float, std: float, dtype):
    """[rows, e] ~ Normal(mean, std), drawn in float32 and cast to `dtype`."""
    return (mean + std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def parallel_embedding_shard(table_shard, ids, rank):
    """What rank `rank` of a vocabulary-parallel embedding computes (docs/maths.md A3).

    table_shard [n, e] holds ids [rank*n, (rank+1)*n); ids [b, s] are global. Returns
    [b, s, e]: the local row for owned ids, zeros elsewhere. Summed over ranks: the embedding.
    """
    return masked_lookup(table_shard, ids - rank * table_shard.shape[0])


def vocab_parallel_lookup(table, ids, mesh: Mesh, axis_name: str, batch_axes=None):
    """Embedding of ids [b, s] with table [v, e] split along v over mesh axis `axis_name`.

    Each shard runs `parallel_embedding_shard` on its block; a psum over `axis_name` sums
    them. ids (and the result [b, s, e]) are split along b over `batch_axes` (None: replicated).
    """

    mesh = placement_mesh(mesh)

    def per_shard(table_shard, ids_block):
        rank = jax.lax.axis_index(axis_name)
        return jax.lax.psum(parallel_embedding_shard(table_shard, ids_block, rank), axis_name)

    table_spec, ids_spec = P(axis_name, None), P(batch_axes, None)
    table = place(table, NamedSharding(mesh, table_spec))
    ids = place(jnp.asarray(ids), NamedSharding(mesh, ids_spec))
    return jax.shard_map(per_shard, mesh=mesh, in_specs=(table_spec, ids_spec),
                         out_specs=P(batch_axes, None, None))(table, ids)


class VocabEmbedding(nn.Module):
    """ids [b, s] (int) -> [b, s, e] in param_dtype. One param "embedding" [v, e] ("vocab", "embed").

    The table is Normal(init_mean, init_std) from jax.random.key(init_seed), or from the
    'params' rng if init_seed is None. Out-of-range ids: ValueError eagerly, zero rows under jit.
    """

    vocab_size: int
    emb_size: int
    init_mean: float = 0.0
    init_std: float = 1.0
    init_seed: int | None = 42
    param_dtype: Any = jnp.float32

    def _init_table(self, rng, shape, dtype):
        key = rng if self.init_seed is None else jax.random.key(self.init_seed)
        return normal_table(key, shape, self.init_mean, self.init_std, dtype)

    @nn.compact
    def __call__(self, ids):
        check_token_ids(ids, self.vocab_size)
        table = self.param("embedding", nn.with_logical_partitioning(self._init_table, EMBEDDING_AXES),
                           (self.vocab_size, self.emb_size), self.param_dtype)
        return masked_lookup(table, ids)


class ParallelVocabEmbedding(nn.Module):
    """VocabEmbedding whose table is sharded along the vocabulary over `axis_name` of `mesh`.

    One param "embedding" [v, e], logical axes ("vocab", "embed"), placed as
    P(axis_name, None). Rank r's block [v/w, e] is Normal(init_mean, init_std) from
    jax.random.key(init_base_seed + r) (from the 'params' rng folded with r if
    init_base_seed is None): torch_ref's per-rank seeding rule (the values differ: other RNG).
    ids [b, s] -> [b, s, e] via `vocab_parallel_lookup`; batch_axes shards b (None: replicated).
    Out-of-range ids: ValueError eagerly, zero rows under jit.
    The mesh may have Auto or Explicit axes (plain `jax.make_mesh`), used inside or outside
    `jax.set_mesh` (see `sharding.placement_mesh`).
    """

    vocab_size: int
    emb_size: int
    mesh: Mesh
    axis_name: str = TENSOR_AXIS
    init_mean: float = 0.0
    init_std: float = 1.0
    init_base_seed: int | None = 42
    param_dtype: Any = jnp.float32
    batch_axes: Any = None

    def __post_init__(self):
        if self.axis_name not in self.mesh.axis_names:
            raise ValueError(f"unknown mesh axis {self.axis_name!r}: the mesh has axes {self.mesh.axis_names}")
        if self.vocab_size % self.world_size:
            raise ValueError(f"vocab_size={self.vocab_size} is not divisible by the {self.world_size} "
                             f"devices of mesh axis {self.axis_name!r}")
        super().__post_init__()

    @property
    def world_size(self) -> int:
        return self.mesh.shape[self.axis_name]

    def _init_table(self, rng, shape, dtype):
        ranks = jnp.arange(self.world_size)
        if self.init_base_seed is None:
            keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, ranks)
        else:
            keys = jax.vmap(jax.random.key)(self.init_base_seed + ranks)
        block_shape = (self.vocab_size // self.world_size, shape[1])
        blocks = jax.vmap(lambda key: normal_table(key, block_shape, self.init_mean, self.init_std, dtype))(keys)
        table = blocks.reshape(shape)  # rank blocks stacked along the vocabulary
        return place(table, NamedSharding(placement_mesh(self.mesh), P(self.axis_name, None)))

    @nn.compact
    def __call__(self, ids):
        check_token_ids(ids, self.vocab_size)
        table = self.param("embedding", nn.with_logical_partitioning(self._init_table, EMBEDDING_AXES),
                           (self.vocab_size, self.emb_size), self.param_dtype)
        return vocab_parallel_lookup(table, ids, self.mesh, self.axis_name, self.batch_axes)
