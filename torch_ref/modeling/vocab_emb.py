"""VocabEmbedding (docs/maths.md A2) and its vocabulary-parallel single-rank form (docs/maths.md A3)."""

from __future__ import annotations

import torch
from torch import nn

from torch_ref.functional import check_token_ids


def _normal_table(rows: int, cols: int, mean: float, std: float, seed: int) -> torch.Tensor:
    """float32 [rows, cols] ~ Normal(mean, std), drawn on CPU from a generator seeded `seed`."""
    generator = torch.Generator().manual_seed(seed)
    return torch.empty(rows, cols).normal_(mean, std, generator=generator)


class VocabEmbedding(nn.Module):
    """E[b, s] = T[I[b, s]]: ids I [b, s] (int) -> E [b, s, e] on I's device, in T's dtype.

    `weight` is T [v, e] ~ Normal(init_mean, init_std) from `init_seed`. I is never modified.
    """

    def __init__(self, vocab_size: int, emb_size: int, init_mean: float = 0.0, init_std: float = 1.0,
                 init_seed: int = 42, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu"):
        super().__init__()
        self.vocab_size, self.emb_size = vocab_size, emb_size
        self.init_mean, self.init_std, self.init_seed = init_mean, init_std, init_seed
        self.weight = nn.Parameter(torch.empty(vocab_size, emb_size, dtype=dtype, device=device))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.copy_(_normal_table(self.vocab_size, self.emb_size, self.init_mean,
                                            self.init_std, self.init_seed))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        check_token_ids(ids, self.vocab_size)
        return self.weight[ids.to(self.weight.device)].to(ids.device)


class ParallelVocabEmbedding(nn.Module):
    """One rank of a vocabulary-parallel embedding: rank r owns ids [r*n, (r+1)*n), n = v // w.

    ids I [b, s] -> E_r [b, s, e]: the row of the local table `weight` [n, e] for owned ids,
    zeros for every other id. Summing E_r over the w ranks gives the full embedding.
    The local table is Normal(init_mean, init_std) from seed init_base_seed + rank.
    """

    def __init__(self, vocab_size: int, emb_size: int, rank: int, world_size: int,
                 init_mean: float = 0.0, init_std: float = 1.0, init_base_seed: int = 42,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        super().__init__()
        if vocab_size % world_size:
            raise ValueError(f"vocab_size={vocab_size} is not divisible by world_size={world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} is outside [0, world_size={world_size})")
        self.vocab_size, self.emb_size, self.rank, self.world_size = vocab_size, emb_size, rank, world_size
        self.shard_size = vocab_size // world_size
        self.init_mean, self.init_std, self.init_base_seed = init_mean, init_std, init_base_seed
        self.weight = nn.Parameter(torch.empty(self.shard_size, emb_size, dtype=dtype, device=device))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.copy_(_normal_table(self.shard_size, self.emb_size, self.init_mean,
                                            self.init_std, self.init_base_seed + self.rank))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        check_token_ids(ids, self.vocab_size)
        local_ids = ids.to(self.weight.device) - self.rank * self.shard_size
        owned = (local_ids >= 0) & (local_ids < self.shard_size)
        rows = self.weight[torch.where(owned, local_ids, torch.zeros_like(local_ids))]
        rows = torch.where(owned[..., None], rows, torch.zeros_like(rows))
        return rows.to(ids.device)
