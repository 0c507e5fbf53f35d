"""GroupRMSNorm (docs/maths.md A1), the literal PyTorch reference."""

from __future__ import annotations

import torch
from torch import nn


class GroupRMSNorm(nn.Module):
    """Y_g = X_g / sqrt(mean(X_g**2) + eps) * gamma_g over contiguous groups of `group_size`.

    X [..., h] -> Y [..., h] with X's dtype and device; computed in float32.
    `weight` (gamma, [h]) carries the HF name so `model.norm.weight`-style keys load.
    """

    def __init__(self, hidden_size: int, group_size: int, eps: float = 1e-5,
                 init_range: tuple[float, float] = (-1.0, 1.0), init_seed: int = 42,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        super().__init__()
        if hidden_size % group_size:
            raise ValueError(f"group_size={group_size} does not divide hidden size {hidden_size}")
        self.hidden_size, self.group_size, self.eps = hidden_size, group_size, eps
        self.init_range, self.init_seed = init_range, init_seed
        self.weight = nn.Parameter(torch.empty(hidden_size, dtype=dtype, device=device))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """gamma ~ Uniform(init_range), drawn on CPU from a generator seeded `init_seed`."""
        generator = torch.Generator().manual_seed(self.init_seed)
        low, high = self.init_range
        values = torch.empty(self.hidden_size).uniform_(low, high, generator=generator)
        with torch.no_grad():
            self.weight.copy_(values)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.hidden_size:
            raise ValueError(f"expected last dim {self.hidden_size}, got shape {tuple(x.shape)}")
        groups = x.float().reshape(*x.shape[:-1], self.hidden_size // self.group_size, self.group_size)
        groups = groups * torch.rsqrt(groups.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        y = groups.reshape(x.shape) * self.weight.float().to(x.device)
        return y.to(x.dtype)
