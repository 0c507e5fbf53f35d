"""Child processes that run one train step each, for memory measured from the outside: peak
RSS polled every 20 ms (killed above a cap) and the child's own high-water mark (VmHWM)."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import time

from harness import GiB, compiled_memory, jax_train_step, random_ids, torch_model, torch_step_fn

ENTRY = pathlib.Path(__file__).with_name("bench_methods.py")  # its `--child` runs `child_step`


def child_step(framework: str, method: str, seq: int, batch: int, layers: int) -> dict:
    """Runs in a child process: one train step; reports RSS before the step and the peak."""
    import os

    import torch

    torch.set_num_threads(os.cpu_count())
    ids = random_ids(batch, seq)
    model = torch_model(method, layers, seq)
    out = {}
    if framework == "jax":
        import jax
        import jax.numpy as jnp

        step, params, cfg = jax_train_step(method, layers, seq, model.state_dict())
        del model
        ids = jnp.asarray(ids)
        memory, compiled = compiled_memory(step, params, ids)
        out["jax_memory"] = memory
        out["rss_before_bytes"] = rss_now()
        start = time.perf_counter()
        jax.block_until_ready(compiled(params, ids))
    else:
        step = torch_step_fn(model, ids)
        out["rss_before_bytes"] = rss_now()
        start = time.perf_counter()
        step()
    out["step_s"] = time.perf_counter() - start
    out["peak_rss_bytes"] = rss_now("VmHWM")  # not ru_maxrss: Linux carries the parent's over fork+exec
    return out


def rss_now(field: str = "VmRSS") -> int:
    """This process's resident set (VmRSS) or its high-water mark (VmHWM), in bytes."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))


def run_child(framework, method, seq, batch, layers, cap_bytes, timeout_s) -> dict:
    """One child step with a memory cap (RSS polled every 20 ms; killed above the cap) and a
    time limit. Returns the child's report, or {"failed": reason}."""
    command = [sys.executable, str(ENTRY), "--child", framework, method, str(seq), str(batch), str(layers)]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    start, peak_seen = time.perf_counter(), 0
    while child.poll() is None:
        try:
            with open(f"/proc/{child.pid}/status") as f:
                rss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))
        except (FileNotFoundError, StopIteration):
            rss = 0
        peak_seen = max(peak_seen, rss)
        if rss > cap_bytes or time.perf_counter() - start > timeout_s:
            child.kill()
            child.wait()
            reason = "memory cap" if rss > cap_bytes else "time limit"
            return {"failed": reason, "peak_rss_seen_bytes": peak_seen, "wall_s": time.perf_counter() - start}
        time.sleep(0.02)
    lines = child.stdout.read().strip().splitlines()
    if child.returncode != 0 or not lines:
        return {"failed": f"exit code {child.returncode}", "peak_rss_seen_bytes": peak_seen}
    return {**json.loads(lines[-1]), "peak_rss_seen_bytes": peak_seen, "wall_s": time.perf_counter() - start}


def describe_child(report) -> str:
    if "failed" in report:
        return f"failed ({report['failed']}), peak seen {report['peak_rss_seen_bytes'] / GiB:.2f} GiB"
    grown = report["peak_rss_bytes"] - report["rss_before_bytes"]
    return f"peak RSS {report['peak_rss_bytes'] / GiB:.2f} GiB (+{grown / GiB:.2f} in the step), step {report['step_s']:.1f}s"
