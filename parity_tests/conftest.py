"""Test session setup: 8 simulated CPU devices, set before anything imports jax, XLA's
optimisation passes and XLA:CPU's fusion emitters off (fast compiles) unless
JAX_RESIDUAL_OPTIMIZED=1, and one persistent XLA compilation cache for the session.

CI runs the suite twice (README): everything but the tests marked `optimized` with the passes
off, then those with JAX_RESIDUAL_OPTIMIZED=1, i.e. the compiler users run (with the passes off
they would prove only what the other tests already prove, on a compiler no user runs).
"""

import atexit
import os
import shutil
import tempfile

# Unless JAX_RESIDUAL_OPTIMIZED=1, XLA:CPU also compiles without its MLIR fusion emitters: these
# tiny programs are compile-bound, and the older emitters compile the same HLO ~3x faster (the
# chunking/remat test of method1: 21.5 s -> 7.1 s of compilation). Codegen only: results move by
# float32 rounding, inside every stated tolerance. Subprocesses inherit it (subprocess_env).
FAST_COMPILE_FLAGS = "" if os.environ.get("JAX_RESIDUAL_OPTIMIZED") == "1" else " --xla_cpu_use_fusion_emitters=false"
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8" + FAST_COMPILE_FLAGS
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One compilation cache for the whole session: this process, the xdist workers it starts and
# every subprocess they run inherit the variable, so a program (same HLO, same options: the
# cache key) compiled by one test is loaded, not compiled again, by the next. Results are those
# of a fresh compile. Every compile is written (threshold 0 s; measured on test_mixed_precision +
# test_causality at -n 2: 224 s without the cache, 192 s with jax's 1 s threshold, 185 s with 0).
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jax_residual_tests_xla_")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)

import jax  # noqa: E402
import pytest  # noqa: E402

from llama_testlib import OPTIMIZED  # noqa: E402  (parity_tests/ is on sys.path: rootdir conftest)

jax.config.update("jax_default_matmul_precision", "highest")
# The suite is dominated by XLA compile time on tiny models; skipping XLA's optimisation
# passes halves it and changes no result beyond float rounding (tolerances are stated per test).
jax.config.update("jax_disable_most_optimizations", not OPTIMIZED)


def pytest_collection_modifyitems(config, items):
    """The `optimized` tests run in the JAX_RESIDUAL_OPTIMIZED=1 pass only (module docstring)."""
    if OPTIMIZED:
        return
    deselected = [item for item in items if item.get_closest_marker("optimized")]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if not item.get_closest_marker("optimized")]


def pytest_report_header(config):
    return f"XLA optimisation passes: {'on (JAX_RESIDUAL_OPTIMIZED=1)' if OPTIMIZED else 'off (fast compile)'}"


@pytest.fixture(scope="session")
def remote_code_cache(tmp_path_factory):
    """HF copies trust_remote_code modules into HF_MODULES_CACHE and imports them as the package
    `transformers_modules`, whose path is fixed at its first import: one tmp dir (not ~/.cache)
    for every test of the session that loads an exported folder (two modules, each with its own
    dir, fail in whichever runs second)."""
    import transformers.dynamic_module_utils

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(transformers.dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path_factory.mktemp("hf_modules")))
        yield
