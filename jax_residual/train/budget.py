"""Training budgets of a sweep (docs/maths.md D): an equal number of steps, or equal training FLOPs.

`--budget steps=N` gives every run N steps (the default: N = --steps). `--budget flops=F` gives
each method the steps its FLOPs per step buy, floor(F / (flops_per_token * tokens_per_step)),
with flops_per_token the analytic count of train/flops.py (the one training logs), so a scheme
that costs more per step trains fewer steps; its learning-rate schedule follows its own steps.
"""

from __future__ import annotations

import dataclasses
import math

KINDS = ("steps", "flops")


@dataclasses.dataclass(frozen=True)
class Budget:
    kind: str  # "steps" | "flops"
    amount: float

    def steps(self, flops_per_token: float, tokens_per_step: int) -> int:
        """Optimiser steps of a run under this budget (at least 1, else ValueError)."""
        if self.kind == "steps":
            return int(self.amount)
        steps = math.floor(self.amount / (flops_per_token * tokens_per_step))
        if steps < 1:
            raise ValueError(f"--budget flops={self.amount:g} buys no step of a model at {flops_per_token:.4g} "
                             f"FLOPs/token x {tokens_per_step} tokens/step; need at least "
                             f"{flops_per_token * tokens_per_step:.4g}")
        return steps


def parse_budget(text: str) -> Budget:
    """'steps=400' or 'flops=1e15' -> Budget; anything else a ValueError saying what is allowed."""
    kind, _, amount = text.partition("=")
    try:
        value = float(amount)
    except ValueError:
        value = math.nan
    whole = kind.strip() != "steps" or value.is_integer()
    if kind.strip() not in KINDS or not math.isfinite(value) or value < 1 or not whole:
        raise ValueError(f"bad budget {text!r}: expected steps=N (an integer >= 1) or flops=F (a number >= 1)")
    return Budget(kind.strip(), value)
