"""Test session setup: 8 simulated CPU devices, set before anything imports jax, and XLA's
optimisation passes off (fast compiles) unless JAX_RESIDUAL_OPTIMIZED=1.

CI runs the suite twice (README): everything with the passes off, then the tests marked
`optimized` with JAX_RESIDUAL_OPTIMIZED=1, i.e. the compiler users run.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

from llama_testlib import OPTIMIZED  # noqa: E402  (parity_tests/ is on sys.path: rootdir conftest)

jax.config.update("jax_default_matmul_precision", "highest")
# The suite is dominated by XLA compile time on tiny models; skipping XLA's optimisation
# passes halves it and changes no result beyond float rounding (tolerances are stated per test).
jax.config.update("jax_disable_most_optimizations", not OPTIMIZED)


def pytest_report_header(config):
    return f"XLA optimisation passes: {'on (JAX_RESIDUAL_OPTIMIZED=1)' if OPTIMIZED else 'off (fast compile)'}"
