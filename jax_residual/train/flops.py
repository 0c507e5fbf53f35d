"""A rough model-FLOP count per trained token, and MFU.

Counted per token, forward + backward = 3 x forward, a multiply-add = 2 FLOPs (the PaLM/
Chinchilla convention; norms, softmax and the optimiser are ignored):

  base:       6 * N_matmul + 6 * L * 2 * s * (nh * hd)
              N_matmul = L * (h*q + 2*h*kv + q*h + 3*h*i) + h*v  (projections, MLP, LM head; the
              embedding lookup is free), and the attention term counts Q K^T and P V over the
              full s x s square (as PaLM does; causal kernels could skip half).
  recompute:  each of the L(L-1)/2 pairs (l, i < l) re-runs layer i on X_l (SPEC B1), fewer
              with the rerun_window / rerun_every knobs:
              "attention" (methods 2, 4.x): V projection, P V, output projection
                           6 * (h*kv + q*h + s*q)
              "mlp" (methods 1, 3.x): the same plus layer i's MLP: + 6 * 3*h*i
  scores:     method 5.x contracts the concatenated queries of layers 0..l: each pair adds
              one Q K^T block, 6 * s * q.
  extra:      whatever else a method's connections cost, from its record (`extra_flops`): the
              schemes of SPEC Part C (peers.py: DenseFormer's averages, value mixing,
              hyper-connections' stream mixing).

This counts the method's mathematics, not what an implementation happens to run (a chunked
re-run that skips nothing but whole chunks does more), so MFU compares methods fairly.
"""

from __future__ import annotations

from jax_residual import ModelConfig
from jax_residual.residual import get_method, rerun_pair_count

# Dense bf16 peak TFLOP/s per device for a few accelerators (device_kind substring -> peak).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "TPU v4": 275.0, "TPU v5 lite": 197.0,
               "TPU v5p": 459.0, "TPU v6": 918.0}


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward) of the model with its residual method."""
    h, i, v, L = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_hidden_layers
    q, kv, s = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim, seq_len
    matmul_params = L * (h * q + 2 * h * kv + q * h + 3 * h * i) + h * v
    base = 6 * matmul_params + 6 * L * 2 * s * q
    method = get_method(cfg.residual_method)
    per_pair = 0
    if method.recompute is not None:
        per_pair += 6 * (h * kv + q * h + s * q)
    if method.recompute == "mlp":
        per_pair += 6 * 3 * h * i
    if method.score_scales is not None:
        per_pair += 6 * s * q
    pairs = L * (L - 1) // 2
    if method.recompute is not None:
        pairs = rerun_pair_count(L, cfg.rerun_window, cfg.rerun_every)
    extra = 0.0 if method.extra_flops is None else method.extra_flops(cfg, seq_len)
    return float(base + pairs * per_pair + extra)


def peak_flops_per_second(device_kind: str, num_devices: int, peak_tflops: float | None) -> float | None:
    """The mesh's peak FLOP/s: --peak-tflops per device if given, else the table above, else
    None (unknown, e.g. a CPU: no MFU is reported)."""
    if peak_tflops is None:
        peak_tflops = next((peak for name, peak in PEAK_TFLOPS.items() if name in device_kind), None)
    return None if peak_tflops is None else peak_tflops * 1e12 * num_devices
