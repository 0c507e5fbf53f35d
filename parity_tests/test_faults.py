"""What clusters do to a training run (jax_residual/train/faults.py): preemption, a lost process,
a failed save, and malformed inputs. Runs are real `train_tpu_gpu.py` subprocesses with the tiny
settings of test_training.py (and its compilation cache fixture), so a program compiles once.

Faults inside the checkpoint write are planted by parity_tests/fault_child.py, which starts the
same command line in-process after patching orbax's write of one step.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from jax_residual.train import faults
from jax_residual.train.metrics import read_records
from test_training import (REPO, TINY_FLAGS, cli_env, finish, finished_checkpoints, free_port, launch,  # noqa: F401
                           losses, one_line_error, small_corpus)

# A run long enough to be signalled mid-way, on the tiny run's schedule (the same compiled
# program); no periodic checkpoint, so the only one before the end is the preemption's.
LONG = ("--steps", "200", "--decay-steps", "4", "--eval-every", "100", "--checkpoint-every", "1000")
DEADLINE_S = 300


def wait_for_step(process: subprocess.Popen, folder: pathlib.Path, step: int, deadline_s: float = DEADLINE_S):
    """Poll the run's metrics until it has logged `step` (bounded); fails if it ended first."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end and process.poll() is None:
        records = read_records(folder / "metrics.jsonl") if (folder / "metrics.jsonl").exists() else []
        if records and records[-1]["step"] >= step:
            return
        time.sleep(0.05)
    pytest.fail(f"the run did not reach step {step} while running (exit {process.poll()})")


@pytest.fixture(scope="module")
def uninterrupted(launch, tmp_path_factory) -> list[dict]:
    """The metrics of the LONG run, never interrupted."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    finish(launch(folder, *LONG))
    return read_records(folder / "metrics.jsonl")


def report(err: str) -> str:
    """The one line a stopped run wrote after its progress bar ('error: ...'), no traceback."""
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def reported_checkpoint(line: str) -> int:
    """N of '... checkpoint N saved ...' in a preemption report."""
    return int(line.split("checkpoint ")[1].split()[0])


def test_sigint_and_sigterm_request_a_stop_then_their_handlers_are_restored():
    stop = faults.StopRequest()
    before = signal.getsignal(signal.SIGINT)
    restore = stop.install()
    try:
        assert not stop.stop_after(1)
        signal.raise_signal(signal.SIGINT)  # the handler runs here, in the main thread
        assert stop.stop_after(2) and stop.describe() == "SIGINT"
    finally:
        restore()
    assert signal.getsignal(signal.SIGINT) is before


@pytest.mark.slow
def test_sigterm_saves_the_step_in_progress_and_resume_is_exact(tmp_path, launch, uninterrupted):
    """SIGTERM at a random step: the run finishes that step, saves it, says so in one line and
    exits 4; rerunning resumes from it to exactly the uninterrupted metrics."""
    at = int(np.random.default_rng(24).integers(5, 60))
    process = launch(tmp_path, *LONG)
    wait_for_step(process, tmp_path, at)
    process.send_signal(signal.SIGTERM)
    (_, err), = finish(process, returncode=4)
    line = report(err)
    assert "stopped by SIGTERM" in line and "rerun the same command to resume" in line
    saved = reported_checkpoint(line)
    assert at <= saved < 200 and finished_checkpoints(tmp_path) == [saved]
    assert read_records(tmp_path / "metrics.jsonl")[-1]["step"] == saved
    (out, _), = finish(launch(tmp_path, *LONG))
    assert f"resuming from step {saved}" in out
    assert losses(read_records(tmp_path / "metrics.jsonl")) == losses(uninterrupted)


def two_processes(launch, folder: pathlib.Path, *flags: str) -> list[subprocess.Popen]:
    """Both processes of a 2-process run (one CPU device each) on `folder`."""
    shared = ("--mesh", "data=2", "--coordinator", f"127.0.0.1:{free_port()}", "--num-processes", "2", *flags)
    return [launch(folder, *shared, "--process-id", str(i)) for i in range(2)]


@pytest.mark.slow
def test_two_processes_agree_on_the_preemption_step(tmp_path, launch):
    """SIGTERM to process 1 only, then (once it has stopped) to process 0, as a scheduler may
    deliver them: both stop after the same step, which is saved and logged last."""
    processes = two_processes(launch, tmp_path, *LONG)
    wait_for_step(processes[0], tmp_path, int(np.random.default_rng(25).integers(5, 60)))
    processes[1].send_signal(signal.SIGTERM)
    processes[1].wait(timeout=DEADLINE_S)
    processes[0].send_signal(signal.SIGTERM)  # still running only if it did not agree
    outputs = finish(*processes, returncode=4)
    steps = {reported_checkpoint(report(err)) for _, err in outputs}
    assert len(steps) == 1 and all("preemption notice" in report(err) for _, err in outputs)
    saved, = steps
    assert finished_checkpoints(tmp_path) == [saved] and read_records(tmp_path / "metrics.jsonl")[-1]["step"] == saved


HEARTBEAT_S = 5


@pytest.mark.slow
def test_a_killed_process_stops_its_peer_in_bounded_time_and_both_resume(tmp_path, launch):
    """SIGKILL process 1 of a 2-process run: process 0 exits 5 within the heartbeat timeout (+ 10 s)
    with one line naming process 1; restarting both resumes from the last checkpoint."""
    flags = (*LONG[:-1], "10", "--heartbeat-timeout", str(HEARTBEAT_S))
    processes = two_processes(launch, tmp_path, *flags)
    wait_for_step(processes[0], tmp_path, 25)
    processes[1].kill()
    killed = time.monotonic()
    processes[1].communicate()
    (_, err), = finish(processes[0], returncode=5)
    exit_s = time.monotonic() - killed
    line = report(err)
    assert "lost process 1 of 2" in line and exit_s < HEARTBEAT_S + 10, (line, exit_s)
    saved = finished_checkpoints(tmp_path)[-1]
    assert f"the last checkpoint is step {saved}" in line
    resumed = finish(*two_processes(launch, tmp_path, *flags[:1], str(saved + 2), *flags[2:]))
    assert f"resuming from step {saved}" in resumed[0][0]
    assert read_records(tmp_path / "metrics.jsonl")[-1]["step"] == saved + 2


@pytest.mark.slow
@pytest.mark.parametrize("fault, message", [("enospc", "No space left on device"), ("permission", "Permission denied"),
                                            ("kill", None)])
def test_a_failed_save_keeps_the_previous_checkpoint_and_the_next_run_resumes(fault, message, tmp_path, cli_env,
                                                                             small_corpus, launch):
    """The save of step 4 fails inside orbax's write: an OSError stops the run with one line and
    exit 6; a kill mid-write just ends it. Either way checkpoint 2 is kept, and the next run
    removes the partial folder of step 4 (saying so) and resumes from checkpoint 2."""
    flags = ("--steps", "6", "--decay-steps", "4")
    child = subprocess.run([sys.executable, "parity_tests/fault_child.py", fault, "4", "--", *TINY_FLAGS,
                            "--data", str(small_corpus), "--output-dir", str(tmp_path), *flags],
                           cwd=REPO, env=cli_env, capture_output=True, text=True, timeout=DEADLINE_S)
    assert finished_checkpoints(tmp_path) == [2] and list((tmp_path / "checkpoints").glob("4.orbax-checkpoint-tmp*"))
    if message is None:
        assert child.returncode == -signal.SIGKILL
    else:
        line = report(child.stderr)
        assert child.returncode == 6 and "saving checkpoint 4" in line and message in line, child.stderr[-3000:]
        assert "checkpoint 2 is kept" in line
    (out, err), = finish(launch(tmp_path, *flags))
    assert "resuming from step 2" in out and "removed 4.orbax-checkpoint-tmp" in err
    assert finished_checkpoints(tmp_path) == [4, 6] and not list((tmp_path / "checkpoints").glob("*tmp*"))
