"""peak: fp32 2048 x 2048 matmul FLOP/s in JAX and torch (the MFU denominator)."""

from __future__ import annotations

import numpy as np

from harness import interleaved_medians, torch_device, torch_sync


MATMUL_N = 2048
MATMUL_FLOPS = 2 * MATMUL_N**3


def matmul_peak_steps() -> dict:
    """fp32 2048 x 2048 matmuls, jax (jitted) and torch: the MFU denominator. The speed section
    runs them inside its rounds, so each method's MFU uses a peak measured under the same load."""
    import jax
    import jax.numpy as jnp
    import torch

    a = jnp.asarray(np.random.default_rng(0).standard_normal((MATMUL_N, MATMUL_N)), jnp.float32)
    matmul = jax.jit(lambda x, y: x @ y)
    t_a = torch.from_numpy(np.array(a)).to(torch_device())
    return {"matmul_jax": lambda: matmul(a, a).block_until_ready(), "matmul_torch": lambda: torch_sync(t_a @ t_a)}


def run(args) -> dict:
    times = interleaved_medians(matmul_peak_steps(), rounds=args.rounds * 2)
    return {name.removeprefix("matmul_"): {"flops_per_s": MATMUL_FLOPS / t["min_s"],
                                            "median_flops_per_s": MATMUL_FLOPS / t["median_s"], **t}
            for name, t in times.items()}
