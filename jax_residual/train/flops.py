"""The model-FLOP count per trained token, and MFU: the one counter of training logs, sweeps and
benchmarks.

Counted per token, forward + backward = 3 x forward, a multiply-add = 2 FLOPs (the PaLM/
Chinchilla convention; norms, softmax and the optimiser are ignored). Every term is read from
the method's record (residual.py), never from its name:

  layers:      6 * L * (h*q + 2*h*kv + q*h + 3*h*i) + 6 * L * 2 * s * q
               (projections, MLP; Q K^T and P V over the full s x s square, as PaLM does;
               causal kernels could skip half)
  lm_head:     6 * h * v (the embedding lookup is free)
  recompute:   `method.recompute`: each re-run pair (l, i < l) (`rerun_pair_count`, fewer with
               the rerun_window / rerun_every knobs) re-runs layer i on X_l (docs/maths.md B1):
               "attention": V projection, P V, output projection   6 * (h*kv + s*q + q*h)
               "mlp":       the same plus layer i's MLP             + 6 * 3*h*i
  scores:      `method.score_scales`: the scores of layer l sum those of layers 0..l: each pair
               adds one Q K^T block, 6 * s * q
  connections: `method.extra_flops(cfg, s)`: whatever else the method's connections add.

This counts the method's mathematics, with its stored probabilities P_i (what torch_ref runs),
not what an implementation happens to run, so MFU compares methods fairly.
`qk_rerun_flops_per_token` is what re-running from stored Q/K instead adds.
"""

from __future__ import annotations

from jax_residual import ModelConfig
from jax_residual.residual import get_method, rerun_pair_count

# Dense bf16 peak TFLOP/s per device for a few accelerators (device_kind substring -> peak).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "TPU v4": 275.0, "TPU v5 lite": 197.0,
               "TPU v5p": 459.0, "TPU v6": 918.0}


def _widths(cfg: ModelConfig) -> tuple[int, int, int, int, int]:
    """(h, q, kv, i, v): hidden, query width nh*hd, key/value width nkv*hd, MLP, vocabulary."""
    return (cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim,
            cfg.intermediate_size, cfg.vocab_size)


def _pairs(cfg: ModelConfig) -> int:
    """The (layer l, earlier layer i) pairs a forward pass re-runs or sums scores over."""
    return rerun_pair_count(cfg.num_hidden_layers, cfg.rerun_window, cfg.rerun_every)


def flops_per_token_parts(cfg: ModelConfig, seq_len: int) -> dict[str, float]:
    """Training FLOPs per token by part: "layers", "lm_head", and, where the method has them,
    "recompute", "scores", "connections"; "total" is their sum."""
    h, q, kv, i, v = _widths(cfg)
    L, s = cfg.num_hidden_layers, seq_len
    method = get_method(cfg.residual_method)
    parts = {"layers": 6 * L * (h * q + 2 * h * kv + q * h + 3 * h * i) + 6 * L * 2 * s * q,
             "lm_head": 6 * h * v}
    if method.recompute is not None:
        parts["recompute"] = _pairs(cfg) * 6 * (h * kv + s * q + q * h + (3 * h * i if method.recompute == "mlp" else 0))
    if method.score_scales is not None:
        parts["scores"] = _pairs(cfg) * 6 * s * q
    if method.extra_flops is not None:
        parts["connections"] = method.extra_flops(cfg, seq_len)
    parts = {name: float(value) for name, value in parts.items()}
    parts["total"] = sum(parts.values())
    return parts


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward) of the model with its residual method."""
    return flops_per_token_parts(cfg, seq_len)["total"]


def qk_rerun_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """What re-running earlier layers from stored Q/K instead of stored P (docs/maths.md B4) adds
    per token: per re-run pair, four Q K^T-sized matmuls (the scores in the forward pass, again
    in the flash-style backward, dQ and dK), 4 * 2 * s * q; 0 for a method that re-runs nothing."""
    _, q, _, _, _ = _widths(cfg)
    return float(get_method(cfg.residual_method).recompute is not None) * _pairs(cfg) * 4 * 2 * seq_len * q


def peak_flops_per_second(device_kind: str, num_devices: int, peak_tflops: float | None) -> float | None:
    """The mesh's peak FLOP/s: --peak-tflops per device if given, else the table above, else
    None (unknown, e.g. a CPU: no MFU is reported)."""
    if peak_tflops is None:
        peak_tflops = next((peak for name, peak in PEAK_TFLOPS.items() if name in device_kind), None)
    return None if peak_tflops is None else peak_tflops * 1e12 * num_devices
