"""TensorBoard event files beside metrics.jsonl (`tensorboard --logdir runs/`), written by process 0.

Every finite number of a metrics record becomes a scalar under its metrics.jsonl name
(train_loss, val_loss, val_bpb, grad_norm, lr, tokens_per_s, ...); the learned connection
weights of a method (the [L, L] per-(layer, earlier layer) weights of `Connection.learned_matrix`) are
an image at each evaluation. A resumed run purges the events after its checkpoint's step, as
metrics.jsonl is cut back, so the curves show one history.
"""

from __future__ import annotations

import math
import pathlib
import sys

import numpy as np

CELL_PIXELS = 16  # each (layer, earlier layer) weight is drawn as a CELL_PIXELS square


def weights_image(weights: np.ndarray) -> np.ndarray:
    """[L, L] weights -> [L*CELL_PIXELS, L*CELL_PIXELS] in [0, 1], min-max scaled (a constant
    matrix is all zeros); TensorBoard shows the scale-free pattern, metrics.jsonl the values."""
    weights = np.asarray(weights, np.float64)
    span = weights.max() - weights.min()
    scaled = (weights - weights.min()) / span if span > 0 else np.zeros_like(weights)
    return np.kron(scaled, np.ones((CELL_PIXELS, CELL_PIXELS))).astype(np.float32)


def summary_writer_class():
    """tensorboardX.SummaryWriter, imported with torch hidden unless torch is imported already:
    tensorboardX's writer imports torch whenever it is installed, only to accept torch tensors
    (this package logs Python floats and numpy arrays), and that import is 2.4 s of every training
    process's start-up on a 2-core CPU."""
    hide = "torch" not in sys.modules
    if hide:
        sys.modules["torch"] = None  # `import torch` raises ImportError while this entry is None
    try:
        from tensorboardX import SummaryWriter
    finally:
        if hide:
            del sys.modules["torch"]
    return SummaryWriter


class TensorBoardLog:
    """Event files in `folder` (nothing unless `writer`); `purge_from`: events of earlier
    invocations at steps >= it are dropped by TensorBoard (None: keep all)."""

    def __init__(self, folder: pathlib.Path, writer: bool, purge_from: int | None):
        self.summary = None
        if writer:
            self.summary = summary_writer_class()(logdir=str(folder), purge_step=purge_from, flush_secs=10)

    def scalars(self, record: dict):
        """Each finite int/float of the record (but its step) at record['step']."""
        if self.summary is None:
            return
        for name, value in record.items():
            if name != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                self.summary.add_scalar(name, value, record["step"])

    def weights(self, name: str, weights: np.ndarray, step: int):
        if self.summary is not None:
            self.summary.add_image(name, weights_image(weights), step, dataformats="HW")

    def close(self):
        if self.summary is not None:
            self.summary.close()
