"""What clusters do to a training run (jax_residual/train/faults.py): preemption, a lost process,
a failed save, and malformed inputs. Runs have the tiny settings of test_training.py (and its
compilation cache fixture), so a program compiles once; those whose test is about the process
(signals, kills, several processes) are real `train_tpu_gpu.py` subprocesses, the others run the
same command line in this process (test_training.run_here).

Faults inside the checkpoint write are planted by parity_tests/fault_child.py, which starts the
same command line in-process after patching orbax's write of one step.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import signal
import subprocess
import sys
import time
from datetime import timedelta

import jax
import numpy as np
import pytest
import safetensors.numpy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jax_residual import LlamaForCausalLM, export, sample
from jax_residual.convert import REQUIRED_HF_FIELDS, load_hf_checkpoint, save_hf_checkpoint
from jax_residual.train import cli, faults
from jax_residual.train.metrics import read_records
from jax_residual.train.run_config import model_config
from test_training import (REPO, TINY, TINY_FLAGS, cli_env, finish, finished_checkpoints, free_port,  # noqa: F401
                           launch, losses, one_line_error, reference_folder, run_here, small_corpus)
from llama_testlib import in_process

# A run long enough to be signalled mid-way, on the tiny run's schedule (the same compiled
# program); no periodic checkpoint, so the only one before the end is the preemption's.
LONG = ("--steps", "60", "--decay-steps", "4", "--eval-every", "100", "--checkpoint-every", "1000")
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
    at = int(np.random.default_rng(24).integers(5, 30))
    process = launch(tmp_path, *LONG)
    wait_for_step(process, tmp_path, at)
    process.send_signal(signal.SIGTERM)
    (_, err), = finish(process, returncode=4)
    line = report(err)
    assert "stopped by SIGTERM" in line and "rerun the same command to resume" in line
    saved = reported_checkpoint(line)
    assert at <= saved < 60 and finished_checkpoints(tmp_path) == [saved]
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
    wait_for_step(processes[0], tmp_path, int(np.random.default_rng(25).integers(5, 30)))
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
def test_a_killed_process_stops_its_peer_in_bounded_time_and_both_resume(tmp_path, launch, record_property):
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
    record_property("seconds_to_exit", round(exit_s, 2))  # in --junitxml's report
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
                                                                             small_corpus, run_here):
    """The save of step 4 fails inside orbax's write: an OSError stops the run with one line and
    exit 6; a kill mid-write just ends it. Either way checkpoint 2 is kept, and the next run
    removes the partial folder of step 4 (saying so) and resumes from checkpoint 2. The failing
    run is a subprocess (its process ends with orbax's writes still under way); the next runs here."""
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
    (out, err), = finish(run_here(tmp_path, *flags))
    assert "resuming from step 2" in out and "removed 4.orbax-checkpoint-tmp" in err
    assert finished_checkpoints(tmp_path) == [4, 6] and not list((tmp_path / "checkpoints").glob("*tmp*"))


# ----------------------------------------------------------------------------- malformed inputs


def refused(main, argv: list[str]) -> str:
    """The one stderr line of a command line refused with exit status 2."""
    status, _, err = in_process(main, argv)
    assert status == 2, (argv, status, err[-2000:])
    return one_line_error(err)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> pathlib.Path:
    """A valid tiny HF Llama folder (random weights)."""
    folder = tmp_path_factory.mktemp("hf")
    cfg = model_config(TINY)
    params = LlamaForCausalLM(cfg).init(jax.random.key(0), np.zeros((1, 4), np.int32))["params"]
    save_hf_checkpoint(params, cfg, folder)
    return folder


def train_argv(small_corpus, tmp_path, *flags: str) -> list[str]:
    return [*TINY_FLAGS, "--data", str(small_corpus), "--output-dir", str(tmp_path / "run"), "--compile-cache", "",
            *flags]


def damaged_copy(hf_folder: pathlib.Path, target: pathlib.Path, config=None, tensors=None) -> pathlib.Path:
    """A copy of hf_folder with config.json replaced by `config` and/or its tensors by `tensors`
    (a function of the state dict)."""
    shutil.copytree(hf_folder, target)
    if config is not None:
        (target / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    if tensors is not None:
        state = safetensors.numpy.load_file(target / "model.safetensors")
        safetensors.numpy.save_file(tensors(state), target / "model.safetensors")
    return target


EMBED = "model.embed_tokens.weight"


@pytest.mark.parametrize("config, tensors, message", [
    ({"model_type": "llama"}, None, "missing field 'vocab_size'; missing field 'hidden_size'"),
    ("{not json", None, "cannot be read as JSON"),
    (None, lambda sd: {**sd, EMBED: sd[EMBED][:, :32]}, f"'{EMBED}' has shape (256, 32), expected (256, 64)"),
    (None, lambda sd: {**sd, EMBED: sd[EMBED].astype(np.int64)}, f"'{EMBED}' has dtype int64"),
    (None, lambda sd: {k: v for k, v in sd.items() if k != EMBED}, f"missing '{EMBED}'"),
])
def test_malformed_hf_folders_are_one_line_errors(config, tensors, message, hf_folder, small_corpus, tmp_path):
    folder = damaged_copy(hf_folder, tmp_path / "hf", config, tensors)
    assert message in refused(cli.main, train_argv(small_corpus, tmp_path, "--init-from-hf", str(folder)))


def test_a_corrupt_tokenizer_json_is_a_one_line_error(hf_folder, small_corpus, tmp_path):
    folder = damaged_copy(hf_folder, tmp_path / "hf")
    (folder / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    line = refused(cli.main, train_argv(small_corpus, tmp_path, "--init-from-hf", str(folder)))
    assert "tokenizer.json is not a readable tokenizer.json" in line


def test_a_run_whose_config_json_no_longer_matches_its_checkpoint(tmp_path, reference_folder):
    """Export and sample read the model from config.json: edited, it is refused before restoring."""
    run = tmp_path / "run"
    shutil.copytree(reference_folder, run)
    config = json.loads((run / "config.json").read_text())
    config["model"]["intermediate_size"] *= 2
    (run / "config.json").write_text(json.dumps(config))
    for main, argv in ((export.main, [str(run), str(tmp_path / "out")]), (sample.main, [str(run)])):
        line = refused(main, argv)
        assert "holds another model than its run's config.json" in line and "gate_proj" in line, line
    assert not (run / "unreadable_checkpoints").exists()  # a good checkpoint is not set aside


# Flags and values no run accepts: (flag, strategy of bad values)
NOT_AN_INT = st.text(alphabet="abcxyz.,-e ", min_size=1, max_size=4).filter(lambda t: not t.strip("-").isdigit())
POSITIVE_FLAGS = ("--steps", "--batch-size", "--seq-len", "--grad-accum", "--eval-every", "--eval-batches",
                  "--checkpoint-every", "--keep-checkpoints", "--heartbeat-timeout")
BAD_TRAIN_FLAGS = st.one_of(
    st.tuples(st.sampled_from(POSITIVE_FLAGS), st.integers(-5, 0).map(str) | NOT_AN_INT),
    st.tuples(st.sampled_from(("--method", "--preset", "--dtype", "--remat")), st.text("qwz_9", min_size=1, max_size=6)),
    st.tuples(st.just("--lr"), st.floats(-1, 0).map(repr)),
    st.tuples(st.just("--mesh"), st.sampled_from(("data", "data=0", "pipe=2", "data=3,tensor=3", "=2"))),
    st.tuples(st.just("--init-from-hf"), st.just("/nonexistent/hf")),
    st.tuples(st.just("--tokenizer"), st.sampled_from(("bpe", "bpe:0", "words", "bpe:x"))),
    st.tuples(st.text("-abcz", min_size=3, max_size=8).map(lambda t: "--" + t.strip("-")), st.just("1")),
)
FIELD_VALUES = st.sampled_from(("12", "[1]", None, True, -3, 0, 2.5, {"a": 1}))


@settings(max_examples=25, deadline=timedelta(seconds=20), derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(flag=BAD_TRAIN_FLAGS)
def test_property_invalid_train_command_lines_exit_2_in_one_line(flag, small_corpus, tmp_path):
    line = refused(cli.main, train_argv(small_corpus, tmp_path, *flag))
    assert line.startswith("train_tpu_gpu.py: error:")


@settings(max_examples=20, deadline=timedelta(seconds=20), derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(field=st.sampled_from(sorted(REQUIRED_HF_FIELDS)), value=FIELD_VALUES | st.just("<missing>"))
def test_property_invalid_hf_configs_exit_2_naming_the_field(field, value, hf_folder, small_corpus, tmp_path_factory):
    config = json.loads((hf_folder / "config.json").read_text())
    if value == "<missing>":
        del config[field]
    else:
        config[field] = value
    folder = damaged_copy(hf_folder, tmp_path_factory.mktemp("hf") / "hf", config)
    line = refused(cli.main, train_argv(small_corpus, folder, "--init-from-hf", str(folder)))
    assert field in line


@settings(max_examples=15, deadline=timedelta(seconds=20), derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(main=st.sampled_from((export.main, sample.main)),
       extra=st.sampled_from(([], ["--step", "x"], ["--step", "7"], ["--bogus"])),
       folder=st.sampled_from(("missing", "a_file", "empty")))
def test_property_invalid_export_and_sample_arguments_exit_2(main, extra, folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("args")
    (root / "a_file").write_text("x")
    (root / "empty").mkdir()
    argv = [str(root / folder), *([str(root / "out")] if main is export.main else []), *extra]
    line = refused(main, argv)
    assert ": error:" in line


def test_loading_never_unpickles(hf_folder, tmp_path, monkeypatch):
    """HF folders are read from safetensors and JSON only: with pickle's loaders broken, a
    folder still loads, and a folder holding only a pickled pytorch_model.bin is refused."""
    import pickle

    def forbidden(*args, **kwargs):
        raise AssertionError("unpickling")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    cfg, _ = load_hf_checkpoint(hf_folder)
    assert cfg.hidden_size == model_config(TINY).hidden_size
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(hf_folder / "config.json", pickled / "config.json")
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04not read")
    with pytest.raises(ValueError, match="no \\*.safetensors files"):
        load_hf_checkpoint(pickled)
