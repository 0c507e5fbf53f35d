"""seq1024: standard / method1 / method2 at seq 1024, batch 2: the speed section's table."""

from __future__ import annotations

import copy

from sections import speed


def run(args) -> dict:
    sub = copy.copy(args)
    sub.seq, sub.batch = 1024, 2
    sub.methods = [m for m in ("standard", "method1", "method2") if m in args.methods] or ["standard", "method1", "method2"]
    return speed.run(sub)
