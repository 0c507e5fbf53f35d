"""metrics.jsonl: one JSON object per line, each with "step" and some of "train_loss", "val_loss"
(nats/token), "val_bpb" (bits/byte), "grad_norm", "param_norm", "lr", "tokens_per_s",
"tflops_per_s", "mfu", the learned residual-method parameters at eval steps (e.g.
"residual_weight_logits": [L][L]), or "error" for a run that stopped.

A resumed run first cuts the file back to the steps its checkpoint covers, so the file of a run
that was killed and resumed equals that of a run that never stopped (timings aside).
"""

from __future__ import annotations

import json
import math
import pathlib


def read_records(path: pathlib.Path) -> list[dict]:
    """The records of a metrics file; a torn last line (a run killed mid-write) is skipped."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def last_value(records: list[dict], key: str):
    """The latest record's `key` (None if no record has it)."""
    return next((r[key] for r in reversed(records) if key in r), None)


def finite_or_text(value: float):
    """JSON has no NaN/inf: non-finite numbers are written as strings."""
    return value if math.isfinite(value) else str(value)


class MetricsLog:
    """Appends records to metrics.jsonl (flushed per line, so a killed run loses nothing it
    logged). `keep_through`: records with step <= it are kept from an earlier invocation, the
    rest dropped (None: start a new file). Only a writer (process 0) touches the file."""

    def __init__(self, path: pathlib.Path, keep_through: int | None, writer: bool):
        self.records = [r for r in read_records(path) if keep_through is not None and r["step"] <= keep_through]
        self.file = None
        if writer:
            path.write_text("".join(json.dumps(r) + "\n" for r in self.records))
            self.file = path.open("a")

    def write(self, record: dict):
        self.records.append(record)
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self):
        if self.file:
            self.file.close()
