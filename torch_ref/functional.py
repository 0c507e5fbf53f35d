"""Pure torch functions of docs/maths.md A, written literally (the reference, no perf tricks).

Shape letters as in jax_residual.functional: b batch, s sequence, h hidden, v vocabulary,
e embedding, nh heads, hd head dim.
"""

from __future__ import annotations

import math

import torch


def check_token_ids(ids: torch.Tensor, vocab_size: int) -> None:
    """Raise ValueError naming the first offending id if any id leaves [0, vocab_size)."""
    bad = ids[(ids < 0) | (ids >= vocab_size)]
    if bad.numel():
        raise ValueError(
            f"token id {int(bad[0])} is out of range: expected 0 <= id < vocab_size={vocab_size}"
        )


def smallest_even_ratio(max_seq_len: int, needed_len: int) -> int:
    """The smallest EVEN k' with max_seq_len * k' >= needed_len (docs/maths.md A4)."""
    return 2 * math.ceil(needed_len / (2 * max_seq_len))


def rope_tables(dim: int, num_positions: int, base: float, ratio: float = 1.0):
    """(C, S), each float32 [num_positions, dim], for positions 0 .. num_positions - 1.

    NTK-aware: the base becomes base * ratio**(dim/(dim-2)); theta_i = beta**(-i),
    beta = base**(2/dim); C = cat(cos(n theta), cos(n theta)), S likewise with sin.
    """
    if dim % 2:
        raise ValueError(f"RoPE head dim must be even, got {dim}")
    scaled_base = base * torch.tensor(ratio, dtype=torch.float32) ** (dim / (dim - 2))
    beta = scaled_base ** (2.0 / dim)
    theta = beta ** -torch.arange(dim // 2, dtype=torch.float32)
    angles = torch.arange(num_positions, dtype=torch.float32)[:, None] * theta[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return torch.cos(angles), torch.sin(angles)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """cat(-x[..., d/2:], x[..., :d/2])."""
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rotary_pos_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """X * C + rotate_half(X) * S for x [b, s, nh, hd] and cos, sin [s, hd].

    Computes in float32, returns x's dtype.
    """
    if x.dim() != 4:
        raise ValueError(f"expected x of shape [b, s, nh, hd], got shape {tuple(x.shape)}")
    x32 = x.float()
    cos, sin = cos.float()[:, None, :], sin.float()[:, None, :]
    return (x32 * cos + rotate_half(x32) * sin).to(x.dtype)
