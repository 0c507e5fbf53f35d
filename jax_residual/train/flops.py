"""The model-FLOP count per trained token, and MFU: the one counter of training logs, sweeps and
benchmarks.

Counted per token, forward + backward = 3 x forward, a multiply-add = 2 FLOPs (the PaLM/
Chinchilla convention; norms, softmax and the optimiser are ignored). Every term is read from
the scheme's family (connections/), never from its name:

  layers:      6 * L * (h*q + 2*h*kv + q*h + 3*h*i) + 6 * L * 2 * s * q
               (projections, MLP; Q K^T and P V over the full s x s square, as PaLM does;
               causal kernels could skip half)
  lm_head:     6 * h * v (the embedding lookup is free)
  + the scheme's own parts, `Connection.flops(cfg, s)` (each family documents its terms):
  recompute:   methods 1-4, the re-run of earlier layers on the current input (connections/rerun.py)
  scores:      method 5, one Q K^T block per summed pair (connections/scores.py)
  connections: the published schemes' mixing (dense.py, values.py, streams.py)

This counts the method's mathematics, with its stored probabilities P_i (what torch_ref runs),
not what an implementation happens to run, so MFU compares methods fairly.
`qk_rerun_flops_per_token` is what re-running from stored Q/K instead adds.
"""

from __future__ import annotations

from jax_residual import ModelConfig

# Dense bf16 peak TFLOP/s per device for a few accelerators (device_kind substring -> peak).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "TPU v4": 275.0, "TPU v5 lite": 197.0,
               "TPU v5p": 459.0, "TPU v6": 918.0}


def _widths(cfg: ModelConfig) -> tuple[int, int, int, int, int]:
    """(h, q, kv, i, v): hidden, query width nh*hd, key/value width nkv*hd, MLP, vocabulary."""
    return (cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim,
            cfg.intermediate_size, cfg.vocab_size)


def flops_per_token_parts(cfg: ModelConfig, seq_len: int) -> dict[str, float]:
    """Training FLOPs per token by part: "layers", "lm_head", and the scheme's own parts
    ("recompute", "scores", "connections"); "total" is their sum."""
    h, q, kv, i, v = _widths(cfg)
    L, s = cfg.num_hidden_layers, seq_len
    parts = {"layers": 6 * L * (h * q + 2 * h * kv + q * h + 3 * h * i) + 6 * L * 2 * s * q,
             "lm_head": 6 * h * v}
    parts = {name: float(value) for name, value in (parts | cfg.scheme.flops(cfg, s)).items()}
    parts["total"] = sum(parts.values())
    return parts


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward) of the model with its residual method."""
    return flops_per_token_parts(cfg, seq_len)["total"]


def qk_rerun_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """What re-running earlier layers from stored Q/K instead of stored P (docs/maths.md B4) adds
    per token (`Connection.qk_rerun_flops`; 0 for a scheme that re-runs nothing)."""
    return float(cfg.scheme.qk_rerun_flops(cfg, seq_len))


def peak_flops_per_second(device_kind: str, num_devices: int, peak_tflops: float | None) -> float | None:
    """The mesh's peak FLOP/s: --peak-tflops per device if given, else the table above, else
    None (unknown, e.g. a CPU: no MFU is reported)."""
    if peak_tflops is None:
        peak_tflops = next((peak for name, peak in PEAK_TFLOPS.items() if name in device_kind), None)
    return None if peak_tflops is None else peak_tflops * 1e12 * num_devices
