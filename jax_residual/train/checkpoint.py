"""Orbax checkpoints of the train state plus a small JSON record of where the data stream is.

Each checkpoint step holds two items: "state" (TrainState: step, params, optimiser state) and
"meta" (step, data seed, data position, init seed). Saves are asynchronous; orbax writes into
a temporary folder and renames it when complete, so a run killed mid-save leaves the previous
checkpoint as the latest. Restoring takes abstract arrays carrying the TARGET shardings, so a
checkpoint written on one mesh restores onto another (8 devices -> 1 included).

A save that fails (an OSError in orbax's write: disk full, permission lost) is raised as
SaveFailed once the run learns of it (the next save or `finish_saves`); the finished
checkpoints are left as they are. What a failed or killed save left (orbax's temporary
folder of its step) is removed when the run next starts (`remove_partial_saves`).
"""

from __future__ import annotations

import contextlib
import logging
import pathlib
import shutil

import jax
import orbax.checkpoint as ocp


@contextlib.contextmanager
def quiet_orbax():
    """Orbax logs (through absl) every damaged file it meets; `restore_newest_readable` reports
    each unreadable checkpoint in one line instead."""
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        absl_logger.setLevel(level)


def drop_orbax_thread_logs(record: logging.LogRecord) -> bool:
    """absl logging filter: orbax logs a failed asynchronous save from its own threads, traceback
    included, at any moment; the error also reaches the main thread, which reports it in one
    line (SaveFailed). orbax's main-thread logs pass."""
    return "orbax" not in record.pathname or record.threadName == "MainThread"


def open_manager(directory: pathlib.Path, keep: int) -> ocp.CheckpointManager:
    """A manager keeping the last `keep` checkpoints under `directory` (created if needed)."""
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=True)
    absl_logger = logging.getLogger("absl")
    if drop_orbax_thread_logs not in absl_logger.filters:
        absl_logger.addFilter(drop_orbax_thread_logs)
    with quiet_orbax():
        return ocp.CheckpointManager(directory.absolute(), options=options, item_names=("state", "meta"))


class SaveFailed(RuntimeError):
    """A checkpoint could not be written; the previous checkpoints are untouched."""


def os_error_of(error: BaseException) -> OSError | None:
    """The OSError that `error` is or was raised from (orbax may wrap its write errors)."""
    while error is not None and not isinstance(error, OSError):
        error = error.__cause__ or error.__context__
    return error


def remove_partial_saves(directory: pathlib.Path) -> list[str]:
    """Delete what failed or killed saves left under `directory` (orbax's temporary folders,
    `<step>.orbax-checkpoint-tmp*`; finished checkpoints are untouched); their names. Called
    before a run opens its checkpoints, while no save is running."""
    partial = sorted(directory.glob("*.orbax-checkpoint-tmp*"))
    if jax.process_index() == 0:
        for path in partial:
            shutil.rmtree(path)
    return [path.name for path in partial]


def save_failed(manager: ocp.CheckpointManager, step: int, error: OSError) -> SaveFailed:
    """The SaveFailed error of step `step` (the run stops on it)."""
    kept = manager.latest_step()
    kept = f"checkpoint {kept} is kept" if kept is not None else "no earlier checkpoint exists"
    return SaveFailed(f"saving checkpoint {step} in {manager.directory} failed ({first_line(error)}); {kept} and "
                      f"the partial files go when you rerun the same command to resume (fix the disk first)")


@contextlib.contextmanager
def reporting_failure(manager: ocp.CheckpointManager, step: int):
    """Turn an OSError of the save of `step` (its own, or orbax's of that asynchronous save)
    into SaveFailed; other errors pass."""
    try:
        with quiet_orbax():  # the failure is reported in one line, not in orbax's tracebacks
            yield
    except Exception as error:
        cause = os_error_of(error)
        if cause is None:
            raise
        raise save_failed(manager, step, cause) from error


def finish_saves(manager: ocp.CheckpointManager):
    """Wait for the asynchronous save in progress; SaveFailed if it failed. (Until then orbax
    counts the step being saved as the latest.)"""
    with reporting_failure(manager, manager.latest_step()):
        manager.wait_until_finished()


def save(manager: ocp.CheckpointManager, state, meta: dict):
    """Start an asynchronous save of `state` at step meta["step"]; returns once the arrays are
    copied off the device buffers, which the next (donating) train step may then reuse.
    SaveFailed if the previous save or this one cannot be written."""
    jax.block_until_ready(state)
    finish_saves(manager)
    with reporting_failure(manager, meta["step"]):
        manager.save(meta["step"], args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                          meta=ocp.args.JsonSave(meta)), force=True)


def restore(manager: ocp.CheckpointManager, step: int, abstract_state):
    """(state, meta) of checkpoint `step`, state placed as abstract_state's shardings say."""
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                            meta=ocp.args.JsonRestore()))
    return restored["state"], restored["meta"]


def first_line(error: BaseException) -> str:
    """'TypeName: first line of the message', for one-line reports."""
    message = str(error).strip().splitlines()
    return f"{type(error).__name__}: {message[0] if message else ''}".rstrip(": ")


def set_aside(manager: ocp.CheckpointManager, step: int) -> pathlib.Path:
    """Move checkpoint `step` out of the manager's folder into <folder>/../unreadable_checkpoints/
    (nothing is deleted; a later save of the same step then writes a fresh one)."""
    target = pathlib.Path(manager.directory).parent / "unreadable_checkpoints" / str(step)
    suffix = 1
    while target.exists():
        target, suffix = target.with_name(f"{step}.{suffix}"), suffix + 1
    if jax.process_index() == 0:
        target.parent.mkdir(parents=True, exist_ok=True)
        (pathlib.Path(manager.directory) / str(step)).rename(target)
    return target


def saved_shapes(manager: ocp.CheckpointManager, step: int) -> dict[str, tuple[int, ...]]:
    """'params.layers.q_proj' -> shape of each parameter in checkpoint `step`, from its metadata."""
    metadata = ocp.PyTreeCheckpointer().metadata(pathlib.Path(manager.directory) / str(step) / "state")
    leaves = jax.tree.leaves(metadata.item_metadata.tree, is_leaf=lambda leaf: hasattr(leaf, "shape"))
    return {leaf.name: tuple(leaf.shape) for leaf in leaves if leaf.name.startswith("params.")}


def shape_mismatches(manager: ocp.CheckpointManager, step: int, abstract_state) -> list[str]:
    """'name: checkpoint (a, b), model (c, d)' for each parameter whose shape in checkpoint `step`
    differs from the model's (`abstract_state`); an unreadable checkpoint has none to report."""
    try:
        with quiet_orbax():
            saved = saved_shapes(manager, step)
    except Exception:  # damaged metadata: restoring it fails and says why
        return []
    flat = jax.tree_util.tree_flatten_with_path(abstract_state.params)[0]
    model = {"params." + jax.tree_util.keystr(path, simple=True, separator="."): tuple(leaf.shape)
             for path, leaf in flat}
    return [f"{name}: checkpoint {saved.get(name)}, model {model.get(name)}" for name in sorted(saved.keys() | model.keys())
            if saved.get(name) != model.get(name)]


def restore_newest_readable(manager: ocp.CheckpointManager, abstract_state, warn, move_unreadable: bool = True):
    """(step, state, meta) of the newest checkpoint that can be read, or None if none can. Each
    newer one that cannot is reported by `warn` (one line naming it and why) and, with
    move_unreadable (a run about to save again), set aside (`set_aside`). ValueError if a
    readable one holds parameters of other shapes than `abstract_state` (an edited config.json)."""
    for step in sorted(manager.all_steps(), reverse=True):
        mismatches = shape_mismatches(manager, step, abstract_state)
        if mismatches:
            raise ValueError(f"checkpoint {step} in {manager.directory} holds another model than its run's "
                             f"config.json or flags ({len(mismatches)} shapes differ: {'; '.join(mismatches[:3])})")
        try:
            with quiet_orbax():
                return (step, *restore(manager, step, abstract_state))
        except Exception as error:  # a damaged checkpoint fails in orbax, tensorstore or json
            where = "left in place"
            if move_unreadable:
                where = f"moved to {set_aside(manager, step)}"
                manager.reload()
            warn(f"warning: checkpoint {step} in {manager.directory} cannot be read ({first_line(error)}); "
                 f"{where}, using an older one")
    return None
