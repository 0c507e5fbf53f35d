"""Orbax checkpoints of the train state plus a small JSON record of where the data stream is.

Each checkpoint step holds two items: "state" (TrainState: step, params, optimiser state) and
"meta" (step, data seed, data position, init seed). Saves are asynchronous; orbax writes into
a temporary folder and renames it when complete, so a run killed mid-save leaves the previous
checkpoint as the latest. Restoring takes abstract arrays carrying the TARGET shardings, so a
checkpoint written on one mesh restores onto another (8 devices -> 1 included).
"""

from __future__ import annotations

import pathlib

import jax
import orbax.checkpoint as ocp


def open_manager(directory: pathlib.Path, keep: int) -> ocp.CheckpointManager:
    """A manager keeping the last `keep` checkpoints under `directory` (created if needed)."""
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=True)
    return ocp.CheckpointManager(directory.absolute(), options=options, item_names=("state", "meta"))


def save(manager: ocp.CheckpointManager, state, meta: dict):
    """Start an asynchronous save of `state` at step meta["step"]; returns once the arrays are
    copied off the device buffers, which the next (donating) train step may then reuse."""
    jax.block_until_ready(state)
    manager.save(meta["step"], args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                      meta=ocp.args.JsonSave(meta)))


def restore(manager: ocp.CheckpointManager, step: int, abstract_state):
    """(state, meta) of checkpoint `step`, state placed as abstract_state's shardings say."""
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                            meta=ocp.args.JsonRestore()))
    return restored["state"], restored["meta"]
