"""The training job (jax_residual.train, train_tpu_gpu.py): data, optimiser, checks, sharded
training, checkpoints and faults, multi-process, sweeps.

Unit tests run in-process. Training runs are real `train_tpu_gpu.py` subprocesses (the 8
devices of a data=4,tensor=2 mesh are simulated CPU devices, as in conftest.py), run two at a
time where they are independent. They share one persistent compilation cache and the same
tiny settings, so a program compiles once per session, and like the in-process suite
(conftest.py) they skip XLA's optimisation passes: the same partitioned programs, compiled
~3x faster. Runs compared with each other always use the same settings.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jax_residual.convert import save_hf_checkpoint
from jax_residual.residual import METHOD_NAMES
from jax_residual.train import data, flops, optim, sweep
from jax_residual.train.budget import Budget, parse_budget
from jax_residual.train.loop import plan
from jax_residual.train.metrics import read_records
from jax_residual.train.run_config import RunConfig, model_config

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = RunConfig(method="standard", preset="tiny", steps=4, batch_size=8, seq_len=32, warmup_steps=1,
                 eval_every=2, eval_batches=2, checkpoint_every=2, lr=3e-3)
LOSS_KEYS = ("train_loss", "val_loss", "grad_norm", "lr")
RTOL = 1e-5  # fp32 reduction order across meshes


@pytest.fixture(scope="module")
def compile_events() -> list[str]:
    """Names of the XLA compilations that happen from now on (cleared by the user)."""
    events = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, *_, **__: events.append(event) if event.startswith("/jax/core/compile") else None)
    return events


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory) -> pathlib.Path:
    """A folder of 12 standard-library sources: real text that subprocesses read quickly."""
    folder = tmp_path_factory.mktemp("corpus")
    for source in data.stdlib_sources(data.stdlib_root())[:12]:
        (folder / source.name).write_bytes(source.read_bytes())
    return folder


def losses(records: list[dict]) -> list[tuple]:
    return [(r["step"], *(r.get(k) for k in LOSS_KEYS)) for r in records]


def assert_close_records(actual: list[dict], expected: list[dict], rtol: float):
    assert [r["step"] for r in actual] == [r["step"] for r in expected]
    for a, e in zip(actual, expected):
        for key in LOSS_KEYS:
            assert (key in a) == (key in e), (a, e)
            if key in e:
                np.testing.assert_allclose(a[key], e[key], rtol=rtol, err_msg=f"{key} at step {e['step']}")


# ----------------------------------------------------------------------------- data


def test_batch_k_is_a_pure_function_of_seed_and_k():
    tokens = np.arange(10_000, dtype=np.uint8)
    first = data.train_batch(tokens, seed=3, index=7, batch_size=8, seq_len=16, grad_accum=2)
    assert first.shape == (2, 4, 17) and first.dtype == np.int32
    np.testing.assert_array_equal(first, data.train_batch(tokens, 3, 7, 8, 16, 2))
    assert not np.array_equal(first, data.train_batch(tokens, 3, 8, 8, 16, 2))
    assert not np.array_equal(first, data.train_batch(tokens, 4, 7, 8, 16, 2))
    # accumulation only reshapes the batch: the same windows in the same order
    np.testing.assert_array_equal(first.reshape(8, 17), data.train_batch(tokens, 3, 7, 8, 16, 1)[0])


def test_default_corpus_is_the_stdlib_split_by_file():
    root = data.stdlib_root()
    names = [p.relative_to(root).as_posix() for p in data.stdlib_sources(root)]
    held_out = data.validation_names(names, data.VALIDATION_FRACTION)
    assert 0 < len(held_out) < len(names) // 10
    assert held_out == data.validation_names(list(reversed(names)), data.VALIDATION_FRACTION)
    assert not any("site-packages" in n for n in names)
    corpus = data.load_corpus(None)
    assert len(corpus.validation) > 100_000 and len(corpus.train) > 10 * len(corpus.validation)
    assert corpus.train.dtype == np.uint8


def test_folder_corpus_holds_out_whole_files(tmp_path):
    for i in range(20):
        (tmp_path / f"doc{i}.txt").write_text(f"document {i} " * 50)
    (tmp_path / "binary.bin").write_bytes(bytes(range(256)))
    corpus = data.load_corpus(str(tmp_path))
    held_out = bytes(corpus.validation)
    assert held_out.count(bytes([data.EOS])) == 1 and held_out.endswith(bytes([data.EOS]))  # ceil(5% of 20) files
    assert held_out[:-1] not in bytes(corpus.train)
    assert bytes(corpus.train).count(bytes([data.EOS])) == 19  # the binary file is left out


# ----------------------------------------------------------------------------- optimiser, FLOPs


def test_method_params_get_their_own_group_without_weight_decay():
    params = {"layers": {"q_proj": np.ones((2, 4, 4), np.float32), "input_layernorm": np.ones((2, 4), np.float32),
                         "residual_weight_logits": np.ones((2, 2), np.float32)},
              "norm": {"weight": np.ones(4, np.float32)}, "lm_head": np.ones((4, 8), np.float32)}
    labels = optim.param_labels(params)
    assert labels == {"layers": {"q_proj": "matrix", "input_layernorm": "norm", "residual_weight_logits": "method"},
                      "norm": {"weight": "norm"}, "lm_head": "matrix"}
    tx = optim.make_optimizer(peak_lr=0.1, warmup_steps=0, total_steps=10, weight_decay=0.5, grad_clip=1.0)
    zero_grads = jax.tree.map(np.zeros_like, params)
    updates, _ = tx.update(zero_grads, tx.init(params), params)
    moved = jax.tree.map(lambda u: bool(np.any(np.asarray(u) != 0)), updates)
    assert moved == jax.tree.map(lambda label: label == "matrix", labels)  # only decay moves them


def test_learning_rate_warms_up_then_decays():
    schedule = optim.learning_rate(1.0, warmup_steps=10, total_steps=100)
    assert float(schedule(0)) == 0.0 and float(schedule(10)) == pytest.approx(1.0)
    assert float(schedule(100)) == pytest.approx(optim.FINAL_LR_FRACTION)
    assert all(float(schedule(s)) >= float(schedule(s + 1)) for s in range(10, 100))


def test_flop_estimate_counts_each_methods_extra_work():
    per_token = {m: flops.flops_per_token(model_config(TINY.replace(method=m, preset="small")), 128)
                 for m in METHOD_NAMES}
    cfg = model_config(TINY.replace(preset="small"))
    assert per_token["standard"] > 6 * cfg.num_hidden_layers * cfg.hidden_size**2
    assert per_token["standard"] < per_token["method5.2"] < per_token["method2"] < per_token["method1"]
    assert per_token["method1"] == per_token["method3.1"] == per_token["method3.2"]
    assert per_token["method2"] == per_token["method4.2"] and per_token["method5.1"] == per_token["method5.5"]


def test_flop_estimate_counts_the_schemes_connections():
    """Part C schemes add their records' extra_flops: 6 FLOPs per multiply-add per token."""
    small = TINY.replace(preset="small")
    cfg = model_config(small)
    h, kv, L, n = cfg.hidden_size, cfg.num_key_value_heads * cfg.head_dim, cfg.num_hidden_layers, 4

    def extra(method, **knobs):
        return flops.flops_per_token(model_config(small.replace(method=method, **knobs)), 128) - \
            flops.flops_per_token(cfg, 128)

    assert extra("denseformer") == 6 * h * sum(l + 2 for l in range(L))  # the DWA after block l sums l + 2 terms
    dilated = sum(len(range(l + 1, -1, -2)) for l in range(L) if (l + 1) % 2 == 0)
    assert extra("denseformer", dense_dilation=2, dense_period=2) == 6 * h * dilated
    assert extra("value_residual") == 6 * 2 * kv * (L - 1)
    static = 6 * 2 * L * ((n + 1) * n * h + n * h)  # 2 connections per layer: width mix + write
    assert extra("hyper_connections") == static
    assert extra("hyper_connections", hc_dynamic=True) == extra("mhc") == static + 6 * 2 * L * n * h * (n + 2)
    assert extra("hyper_connections", hc_expansion=2) < static


# ----------------------------------------------------------------------------- budgets and statistics


@pytest.mark.parametrize("text, budget", [("steps=40", Budget("steps", 40)), ("flops=2.5e12", Budget("flops", 2.5e12))])
def test_parse_budget(text, budget):
    assert parse_budget(text) == budget


@pytest.mark.parametrize("text", ["steps=2.5", "flops=0", "time=3", "steps", "flops=x", "flops=inf"])
def test_bad_budget_says_what_is_allowed(text):
    with pytest.raises(ValueError, match=r"bad budget .*expected steps=N .* or flops=F"):
        parse_budget(text)


def test_flops_budget_gives_each_method_the_steps_it_buys(tmp_path):
    """steps = floor(F / (FLOPs/token x tokens/step)), per method; the knobs a method does not
    read are reset for it; a budget below one step, or a fixed --decay-steps, is refused."""
    methods = ("standard", "hyper_connections", "method1")
    run = TINY.replace(output_dir=str(tmp_path), hc_dynamic=True)
    per_step = {m: flops.flops_per_token(model_config(sweep.own_knobs(run.replace(method=m))), run.seq_len)
                * run.tokens_per_step for m in methods}
    budget = 10.5 * per_step["standard"]
    runs = sweep.sweep_runs(run, methods, 2, Budget("flops", budget))
    steps = {r.method: r.steps for r in runs}
    assert steps == {m: math.floor(budget / per_step[m]) for m in methods}
    assert steps["standard"] == 10 > steps["hyper_connections"] > steps["method1"]
    assert [r.hc_dynamic for r in runs] == [False, False, True, True, False, False]
    assert {r.steps for r in sweep.sweep_runs(run, methods, 2, Budget("steps", 7))} == {7}
    with pytest.raises(ValueError, match="buys no step"):
        sweep.sweep_runs(run, methods, 1, Budget("flops", per_step["standard"] / 2))
    with pytest.raises(ValueError, match="--decay-steps cannot be combined with --budget flops"):
        sweep.sweep_runs(run.replace(decay_steps=20), methods, 1, Budget("flops", budget))


def test_welch_p_value_matches_scipy():
    stats = pytest.importorskip("scipy.stats")  # a test dependency (pyproject [test])
    a, b = [2.71, 2.74, 2.69], [2.80, 2.77, 2.86, 2.79]
    np.testing.assert_allclose(sweep.welch_p_value(a, b), stats.ttest_ind(a, b, equal_var=False).pvalue, rtol=1e-5)
    assert sweep.welch_p_value([1.0], b) is None and sweep.welch_p_value([1.0, 1.0], [2.0, 2.0]) is None


# ----------------------------------------------------------------------------- checks before compiling


@pytest.mark.parametrize("changes, num_devices, message", [
    (dict(mesh="data=4,tensor=2", batch_size=6), 8, "divisible by --grad-accum x the mesh's data*fsdp"),
    (dict(mesh="data=2", batch_size=8, grad_accum=3), 2, "divisible by --grad-accum"),
    (dict(mesh="data=1,tensor=4", num_heads=2), 4, "num_attention_heads = 2 is not divisible by the mesh's tensor = 4"),
    (dict(mesh="data=2,tensor=4", num_heads=4, num_kv_heads=2), 8, "num_key_value_heads = 2 is not divisible"),
    (dict(mesh="tensor=3", num_heads=3, num_kv_heads=3, hidden_size=48, intermediate_size=96), 3,
     "vocab_size = 256 is not divisible by the mesh's tensor = 3"),
    (dict(method="method9"), 1, "unknown residual_method 'method9'"),
    (dict(seq_len=4096), 1, "--seq-len 4096 exceeds the model's max_position_embeddings"),
    (dict(mesh="data=4"), 2, "uses 4 devices but 2 are available"),
    (dict(warmup_steps=4), 1, "--warmup-steps must be in [0, --decay-steps or --steps) = [0, 4)"),
])
def test_invalid_runs_fail_before_compiling(changes, num_devices, message, tmp_path, compile_events):
    compile_events.clear()
    with pytest.raises(ValueError, match="invalid run") as error:
        plan(TINY.replace(output_dir=str(tmp_path), **changes), jax.devices()[:num_devices])
    assert message in str(error.value)
    assert not compile_events and not (tmp_path / "checkpoints").exists()


def test_cli_reports_bad_flags_with_what_is_allowed():
    result = subprocess.run([sys.executable, "train_tpu_gpu.py", "--method", "method7", "--steps", "3"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "invalid choice: 'method7'" in result.stderr and "method5.5" in result.stderr


# ----------------------------------------------------------------------------- training runs (subprocesses)

TINY_FLAGS = ("--preset", "tiny", "--method", "standard", "--batch-size", "8", "--seq-len", "32", "--steps", "4",
              "--warmup-steps", "1", "--eval-every", "2", "--eval-batches", "2", "--checkpoint-every", "2")


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory) -> dict:
    """Environment of the train_tpu_gpu.py subprocesses (no inherited device-count flag)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="true",
               JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("xla_cache")))
    return env


@pytest.fixture(scope="module")
def launch(cli_env, small_corpus):
    """launch(output, *flags) -> Popen of train_tpu_gpu.py with TINY_FLAGS, then `flags`."""

    def start(output: pathlib.Path, *flags: str) -> subprocess.Popen:
        command = [sys.executable, "train_tpu_gpu.py", *TINY_FLAGS, "--data", str(small_corpus),
                   "--output-dir", str(output), *flags]
        return subprocess.Popen(command, cwd=REPO, env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)

    return start


def finish(*processes: subprocess.Popen, returncode: int = 0) -> list[tuple[str, str]]:
    """Wait for the processes; assert each exited with `returncode`; their (stdout, stderr)."""
    outputs = [p.communicate(timeout=600) for p in processes]
    for p, (out, err) in zip(processes, outputs):
        assert p.returncode == returncode, f"exit {p.returncode}\n{out[-2000:]}\n{err[-4000:]}"
    return outputs


def train_runs(launch, *runs: tuple) -> list[list[dict]]:
    """Train (output, *flags) runs two at a time; their metrics records."""
    for pair in range(0, len(runs), 2):
        finish(*(launch(*run) for run in runs[pair:pair + 2]))
    return [read_records(run[0] / "metrics.jsonl") for run in runs]


def finished_checkpoints(folder: pathlib.Path) -> list[int]:
    """Steps of the complete checkpoints (orbax renames a step's folder when it is complete)."""
    return sorted(int(p.name) for p in folder.glob("checkpoints/*") if p.name.isdigit())


@pytest.fixture(scope="module")
def reference_folder(launch, tmp_path_factory) -> pathlib.Path:
    """The tiny standard run on one device: what the other layouts must reproduce."""
    folder = tmp_path_factory.mktemp("reference")
    train_runs(launch, (folder,))
    return folder


@pytest.fixture(scope="module")
def reference(reference_folder) -> list[dict]:
    return read_records(reference_folder / "metrics.jsonl")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["standard", "method1", "method5.2"])
def test_data4_tensor2_mesh_matches_one_device(method, tmp_path, launch, reference):
    sharded_run = (tmp_path / "eight", "--method", method, "--mesh", "data=4,tensor=2")
    if method == "standard":  # the reference is this one-device run
        (sharded,), single = train_runs(launch, sharded_run), reference
    else:
        single, sharded = train_runs(launch, (tmp_path / "one", "--method", method), sharded_run)
    assert_close_records(sharded, single, RTOL)
    assert single[-1]["train_loss"] < single[1]["train_loss"] and "val_loss" in single[-1]
    config = json.loads((tmp_path / "eight/config.json").read_text())
    assert config["mesh"] == {"data": 4, "fsdp": 1, "tensor": 2} and len(config["devices"]) == 8


@pytest.mark.slow
def test_checkpoint_from_8_devices_resumes_on_1(tmp_path, launch, reference):
    train_runs(launch, (tmp_path, "--steps", "2", "--decay-steps", "4", "--mesh", "data=4,tensor=2"))
    assert finished_checkpoints(tmp_path) == [2]
    (out, _), = finish(launch(tmp_path, "--decay-steps", "4"))  # 1 device, the same schedule
    assert "resuming from step 2" in out and "over 1 cpu device" in out
    assert_close_records(read_records(tmp_path / "metrics.jsonl"), reference, RTOL)


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, launch):
    (_, err), = finish(launch(tmp_path, "--inject-nan-at", "2"), returncode=3)
    assert "non-finite training loss (nan)" in err and "at step 3" in err and "last good checkpoint is step 2" in err
    assert finished_checkpoints(tmp_path) == [2]
    records = read_records(tmp_path / "metrics.jsonl")
    assert records[-1]["step"] == 3 and "non-finite" in records[-1]["error"]
    (out, _), = finish(launch(tmp_path))  # the same run without the fault resumes from step 2
    assert "resuming from step 2" in out and finished_checkpoints(tmp_path) == [2, 4]
    records = read_records(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4] and math.isfinite(records[-1]["val_loss"])


@pytest.mark.slow
def test_sigkill_mid_training_resumes_to_the_same_metrics(tmp_path, launch):
    # 120 steps on the tiny run's schedule (--decay-steps 4): the same compiled program
    flags = ("--steps", "120", "--decay-steps", "4", "--eval-every", "40", "--checkpoint-every", "10")
    uninterrupted, killed = tmp_path / "uninterrupted", tmp_path / "killed"
    process, reference_process = launch(killed, *flags), launch(uninterrupted, *flags)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        done, saved = read_records(killed / "metrics.jsonl"), finished_checkpoints(killed)
        if saved and done and done[-1]["step"] > saved[-1] + 3:
            break
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.communicate()
    killed_at, saved = read_records(killed / "metrics.jsonl")[-1]["step"], finished_checkpoints(killed)[-1]
    assert 0 < saved < killed_at < 120

    finish(reference_process)
    (out, _), = finish(launch(killed, *flags))
    assert f"resuming from step {saved}" in out
    assert losses(read_records(killed / "metrics.jsonl")) == losses(read_records(uninterrupted / "metrics.jsonl"))
    assert (killed / "loss_curve.png").stat().st_size > 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_with_grad_accum_match_one(tmp_path, launch, reference):
    """Two processes x 2 devices (data=2, tensor=2), each batch in 2 micro-batches, equal one device."""
    shared = tmp_path / "two"
    coordinator = ("--mesh", "data=2,tensor=2", "--grad-accum", "2", "--coordinator", f"127.0.0.1:{free_port()}",
                   "--num-processes", "2")
    processes = [launch(shared, *coordinator, "--process-id", str(i)) for i in range(2)]
    (first, _), (second, _) = finish(*processes)
    assert "{'data': 2, 'fsdp': 1, 'tensor': 2}" in first and "2 process(es)" in first
    assert "done:" in first and "done:" not in second  # only process 0 reports
    assert_close_records(read_records(shared / "metrics.jsonl"), reference, RTOL)
    assert finished_checkpoints(shared) == [2, 4]


@pytest.mark.slow
def test_sweep_writes_table_curves_and_learned_weights(tmp_path, launch):
    methods = ("standard", "method4.2", "method5.5")
    (out, _), = finish(launch(tmp_path, "--sweep", ",".join(methods), "--seeds", "2"))
    assert "| method4.2 | 2 |" in out
    table = json.loads((tmp_path / "sweep.json").read_text())["rows"]
    assert [row["method"] for row in table] == list(methods)
    for row in table:
        assert row["seeds"] == [0, 1] and row["mean"] == pytest.approx(np.mean(row["final_val_loss"]))
    assert "± " in (tmp_path / "sweep.md").read_text()
    for method in methods:  # one data order for all runs, the seed changes the initial parameters
        configs = [json.loads((tmp_path / method / f"seed{s}/config.json").read_text())["run"] for s in (0, 1)]
        assert [c["data_seed"] for c in configs] == [0, 0] and [c["seed"] for c in configs] == [0, 1]

    learned = json.loads((tmp_path / "learned_weights.json").read_text())
    assert set(learned) == {"method4.2", "method5.5"}
    weights = np.array(learned["method4.2"]["per_seed"]["0"]["weights"])
    layers = weights.shape[0]
    assert weights.shape == (layers, layers) and layers == model_config(TINY).num_hidden_layers
    np.testing.assert_allclose(weights[1:].sum(axis=1), 1.0, rtol=1e-6)  # a softmax over the earlier layers
    assert np.all(np.triu(weights) == 0)
    assert np.all(np.triu(np.array(learned["method5.5"]["mean_weights"]), 1) == 0)  # layers <= l only
    for name in ("val_curves.png", "learned_weights.png"):
        assert (tmp_path / name).stat().st_size > 10_000


@pytest.mark.slow
def test_init_from_hf_starts_from_the_checkpoints_weights(tmp_path, launch, reference_folder, reference):
    """Save the reference run's final weights as an HF Llama folder and start a run from it: its
    step-0 validation loss is the reference's final one (the same weights on the same data)."""
    state = ocp.StandardCheckpointer().restore((reference_folder / "checkpoints/4/state").absolute())
    hf_folder = tmp_path / "hf"
    save_hf_checkpoint(state["params"], model_config(TINY), hf_folder)
    assert (hf_folder / "model.safetensors").exists()
    records, = train_runs(launch, (tmp_path / "run", "--init-from-hf", str(hf_folder), "--steps", "2",
                                   "--decay-steps", "4"))
    assert records[0]["step"] == 0 and records[-1]["step"] == 2
    np.testing.assert_allclose(records[0]["val_loss"], reference[-1]["val_loss"], rtol=RTOL)


@pytest.mark.slow
def test_flops_budget_sweep_of_the_schemes_resumes_without_retraining(tmp_path, cli_env, small_corpus):
    """Every Part C scheme trains from the command line in a FLOP-matched sweep. The sweep is
    killed when its fifth run starts; rerunning the same command restores the four finished runs
    (their metrics untouched, their learned weights those of their last checkpoint), trains the
    rest, and tabulates all of them: steps, FLOP ratios, tokens/s, p-values."""
    methods = ("standard", "denseformer", "value_residual", "hyper_connections", "mhc")
    run = TINY.replace(hc_dynamic=True)
    per_step = {m: flops.flops_per_token(model_config(sweep.own_knobs(run.replace(method=m))), run.seq_len)
                * run.tokens_per_step for m in methods}
    budget = 4.2 * per_step["standard"]
    command = [sys.executable, "train_tpu_gpu.py", *TINY_FLAGS, "--data", str(small_corpus), "--output-dir",
               str(tmp_path), "--sweep", ",".join(methods), "--seeds", "2", "--budget", f"flops={budget!r}",
               "--hc-dynamic"]
    first = subprocess.Popen(command, cwd=REPO, env={**cli_env, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)
    for line in first.stdout:  # blocks on the child's output: no polling
        if line.startswith("=== sweep run 5/10"):
            break
    first.kill()
    first.communicate()
    finished = {(m, s): (tmp_path / m / f"seed{s}/metrics.jsonl").read_bytes()
                for m in ("standard", "denseformer") for s in (0, 1)}

    (out, _), = finish(subprocess.Popen(command, cwd=REPO, env=cli_env, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True))
    for (method, seed), metrics in finished.items():
        assert (tmp_path / method / f"seed{seed}/metrics.jsonl").read_bytes() == metrics, (method, seed)
    expected_steps = {m: math.floor(budget / per_step[m]) for m in methods}
    assert out.count(f"resuming from step {expected_steps['standard']}") >= 4
    rows = {row["method"]: row for row in json.loads((tmp_path / "sweep.json").read_text())["rows"]}
    assert list(rows) == list(methods)
    for method, row in rows.items():
        assert row["steps"] == [expected_steps[method]] and row["seeds"] == [0, 1] and row["tokens_per_s"] > 0
        assert row["flops_ratio"] == pytest.approx(per_step[method] / per_step["standard"])
        assert (row["p_value"] is None) == (method == "standard") and all(map(math.isfinite, row["final_val_loss"]))
    assert expected_steps["standard"] == 4 > expected_steps["mhc"]
    learned = json.loads((tmp_path / "learned_weights.json").read_text())
    for seed in (0, 1):  # restored from the checkpoint: the weights logged at the run's last step
        last = read_records(tmp_path / "denseformer" / f"seed{seed}/metrics.jsonl")[-1]
        np.testing.assert_array_equal(learned["denseformer"]["per_seed"][str(seed)]["params"]["dense_weights"],
                                      last["dense_weights"])
    assert learned["hyper_connections"]["mean_weights"] is None and "hc_dynamic_alpha" in \
        learned["hyper_connections"]["per_seed"]["0"]["params"]
    assert (tmp_path / "val_curves.png").stat().st_size > 10_000
