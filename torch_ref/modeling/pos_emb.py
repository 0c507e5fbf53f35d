"""NTK-aware rotary position embedding (docs/maths.md A4), the literal PyTorch reference."""

from __future__ import annotations

import torch
from torch import nn

from torch_ref.functional import apply_rotary_pos_emb, rope_tables, smallest_even_ratio


class NTKAwareRoPE(nn.Module):
    """Rotary embedding with NTK-aware base scaling by `ratio` (k).

    Holds (C, S) as non-persistent buffers `cos`, `sin` [ms*k, dim]. forward(X [b, s, nh, hd],
    offset) rotates positions offset .. offset+s-1 and returns X's shape, dtype and device.
    If offset + s > ms*k the call uses the smallest even k' with ms*k' >= offset + s; with
    dynamic=True the module keeps k' (attribute `ratio`) and its tables for later calls.
    """

    def __init__(self, dim: int, max_seq_len: int, base: float = 10000, ratio: float = 1,
                 dynamic: bool = False, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu"):
        super().__init__()
        if dim % 2:
            raise ValueError(f"RoPE head dim must be even, got {dim}")
        self.dim, self.max_seq_len, self.base, self.dynamic = dim, max_seq_len, base, dynamic
        self.ratio = ratio
        cos, sin = self._tables(ratio, dtype, device)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _tables(self, ratio: float, dtype: torch.dtype, device: str | torch.device):
        """(C, S) [ms*ratio, dim] in `dtype` on `device`."""
        cos, sin = rope_tables(self.dim, int(self.max_seq_len * ratio), self.base, ratio)
        return cos.to(dtype=dtype, device=device), sin.to(dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        if x.dim() != 4 or x.shape[-1] != self.dim:
            raise ValueError(f"expected x of shape [b, s, nh, {self.dim}], got shape {tuple(x.shape)}")
        needed = offset + x.shape[1]
        cos, sin = self.cos, self.sin
        if needed > self.max_seq_len * self.ratio:
            ratio = smallest_even_ratio(self.max_seq_len, needed)
            cos, sin = self._tables(ratio, self.cos.dtype, self.cos.device)
            if self.dynamic:
                self.ratio, self.cos, self.sin = ratio, cos, sin
        positions = slice(offset, needed)
        return apply_rotary_pos_emb(x, cos[positions].to(x.device), sin[positions].to(x.device))
