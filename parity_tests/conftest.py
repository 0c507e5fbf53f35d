"""Test session setup: 8 simulated CPU devices, set before anything imports jax."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
# The suite is dominated by XLA compile time on tiny models; skipping XLA's optimisation
# passes halves it and changes no result beyond float rounding (tolerances are stated per test).
jax.config.update("jax_disable_most_optimizations", True)
