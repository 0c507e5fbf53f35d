"""remat: method1 under the three remat policies (time and XLA temp memory)."""

from __future__ import annotations

from harness import timed_variants


def run(args) -> dict:
    """method1 (batch --knob-batch) under the three remat policies."""
    return {"batch": args.knob_batch, "method1": timed_variants(
        "method1", {f"remat={r}": {"remat": r} for r in ("none", "recompute", "layer")}, args, batch=args.knob_batch)}
