"""The training job (jax_residual.train, train_tpu_gpu.py): data, optimiser, checks, sharded
training, checkpoints and faults, multi-process, sweeps.

Unit tests run in-process. Training runs are real `train_tpu_gpu.py` subprocesses (the 8
devices of a data=4,tensor=2 mesh are simulated CPU devices, as in conftest.py), run two at a
time where they are independent. They share the session's persistent compilation cache (conftest.py)
and the same tiny settings, so a program compiles once per session, and like the in-process suite
(conftest.py) they skip XLA's optimisation passes: the same partitioned programs, compiled
~3x faster. Runs compared with each other always use the same settings.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import pathlib
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
import scipy.stats

from jax_residual import ModelConfig, export, sample
from jax_residual.convert import load_hf_checkpoint, save_hf_checkpoint
from llama_testlib import in_process, stdlib_corpus, subprocess_env
from jax_residual.connections import METHOD_NAMES, SCHEMES
from jax_residual.connections.rerun import Rerun, sum_of_earlier
from jax_residual.data import sources
from jax_residual.train import cli, flops, optim, plots, sweep
from jax_residual.train.budget import Budget, parse_budget
from jax_residual.train.loop import plan, train
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
    """Standard-library sources that subprocesses prepare quickly (2 validation, 12 train files)."""
    return stdlib_corpus(tmp_path_factory.mktemp("corpus"))


def losses(records: list[dict]) -> list[tuple]:
    return [(r["step"], *(r.get(k) for k in LOSS_KEYS)) for r in records]


def assert_close_records(actual: list[dict], expected: list[dict], rtol: float):
    assert [r["step"] for r in actual] == [r["step"] for r in expected]
    for a, e in zip(actual, expected):
        for key in LOSS_KEYS:
            assert (key in a) == (key in e), (a, e)
            if key in e:
                np.testing.assert_allclose(a[key], e[key], rtol=rtol, err_msg=f"{key} at step {e['step']}")


# ----------------------------------------------------------------------------- data (more: test_data.py)


def test_default_corpus_is_the_stdlib_split_by_document(tmp_path):
    """With no --data the run prepares the standard library's sources (no installed packages)
    into its folder's data/, train / validation / test by document hash."""
    source = sources.open_source(None)
    files = sources.stdlib_sources(sources.stdlib_root())
    assert len(files) > 500 and not any("site-packages" in f.parts for f in files)
    p = plan(TINY.replace(output_dir=str(tmp_path)), jax.devices()[:1])
    assert p.corpus.folder == (tmp_path / "data").absolute() and p.corpus.meta["source"] == source.description
    counts = {name: split["documents"] for name, split in p.corpus.meta["splits"].items()}
    assert 0.02 < counts["validation"] / len(files) < 0.08 and 0.02 < counts["test"] / len(files) < 0.08
    assert len(p.corpus.validation) > 100_000 and len(p.corpus.train) > 10 * len(p.corpus.validation)
    assert p.corpus.validation_tokens_per_byte == 1.0


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


@pytest.mark.parametrize("warmup, total", [(10, 100), (0, 10), (3, 7)])
def test_learning_rate_warms_up_then_decays(warmup, total):
    """Our jnp schedule (its settings may be traced) against optax's warmup_cosine_decay_schedule
    at every step and past the end: float32, 1e-7 of the peak (the two round differently)."""
    schedule = optim.learning_rate(6e-3, warmup_steps=warmup, total_steps=total)
    reference = optax.warmup_cosine_decay_schedule(0.0, 6e-3, warmup, total, 6e-3 * optim.FINAL_LR_FRACTION)
    for s in range(total + 5):
        assert float(schedule(s)) == pytest.approx(float(reference(s)), abs=1e-7 * 6e-3), s
    assert float(schedule(0)) == pytest.approx(0.0 if warmup else 6e-3) and float(schedule(warmup)) == pytest.approx(6e-3)
    assert float(schedule(total + 4)) == pytest.approx(6e-3 * optim.FINAL_LR_FRACTION)
    assert all(float(schedule(s)) >= float(schedule(s + 1)) for s in range(warmup, total + 4))


def test_the_schedules_settings_are_optimiser_state():
    """with_schedule sets the learning rate and steps of a state; the update reads them there."""
    params = {"lm_head": jnp.ones((4, 8))}
    tx = optim.make_optimizer(1.0, 0, 1, weight_decay=0.0, grad_clip=1e9)
    grads = {"lm_head": jnp.full((4, 8), 0.5)}
    for lr, warmup, total in ((0.1, 0, 10), (0.3, 2, 10)):
        state = optim.with_schedule(tx.init(params), lr, warmup, total)
        reference = optax.adamw(optim.learning_rate(lr, warmup, total), *optim.BETAS, weight_decay=0.0)
        expected_state = reference.init(params)
        for _ in range(3):
            updates, state = tx.update(grads, state, params)
            expected, expected_state = reference.update(grads, expected_state, params)
            np.testing.assert_allclose(updates["lm_head"], expected["lm_head"], rtol=1e-6)


def test_flop_estimate_counts_each_methods_extra_work():
    per_token = {m: flops.flops_per_token(model_config(TINY.replace(method=m, preset="small")), 128)
                 for m in METHOD_NAMES}
    cfg = model_config(TINY.replace(preset="small"))
    assert per_token["standard"] > 6 * cfg.num_hidden_layers * cfg.hidden_size**2
    assert per_token["standard"] < per_token["method5.2"] < per_token["method2"] < per_token["method1"]
    assert per_token["method1"] == per_token["method3.1"] == per_token["method3.2"]
    assert per_token["method2"] == per_token["method4.2"] and per_token["method5.1"] == per_token["method5.5"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class RerunPlus(Rerun):
    """A re-run scheme whose connections add 1000 FLOPs per position."""

    def flops(self, cfg, seq):
        return super().flops(cfg, seq) | {"connections": 1000.0 * seq}


def test_flop_counter_reads_the_method_record_not_its_name(monkeypatch):
    """A scheme registered later under any name is counted from its family: its re-runs (here
    layer i's V/O projections, P V and MLP per pair (l, i < l)) and its own extra terms."""
    monkeypatch.setitem(SCHEMES, "rerun_mlp_plus", RerunPlus(name="rerun_mlp_plus", sublayer="mlp",
                                                             earlier_weights=sum_of_earlier))
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, residual_method="rerun_mlp_plus")
    h, q, kv, i, v, L, s, pairs = 32, 32, 16, 64, 64, 3, 16, 3
    expected = {"layers": 6 * L * (h * q + 2 * h * kv + q * h + 3 * h * i + 2 * s * q), "lm_head": 6 * h * v,
                "recompute": 6 * pairs * (h * kv + s * q + q * h + 3 * h * i), "connections": 1000.0 * s}
    parts = flops.flops_per_token_parts(cfg, s)
    assert parts == {**expected, "total": sum(expected.values())}
    assert flops.qk_rerun_flops_per_token(cfg, s) == pairs * 4 * 2 * s * q
    assert flops.qk_rerun_flops_per_token(cfg.replace(residual_method="method5.2"), s) == 0
    assert flops.flops_per_token(cfg.replace(residual_method="method1"), s) == parts["total"] - 1000.0 * s


def test_flop_estimate_counts_the_schemes_connections():
    """The published schemes (docs/maths.md C) add their families' connection FLOPs: 6 FLOPs per multiply-add per token."""
    small = TINY.replace(preset="small")
    cfg = model_config(small)
    h, kv, L, n = cfg.hidden_size, cfg.num_key_value_heads * cfg.head_dim, cfg.num_hidden_layers, 4

    def extra(method, **knobs):
        return flops.flops_per_token(model_config(small.replace(method=method).with_knobs(**knobs)), 128) - \
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
    run = TINY.replace(output_dir=str(tmp_path)).with_knobs(hc_dynamic=True)
    per_step = {m: flops.flops_per_token(model_config(sweep.own_knobs(run.replace(method=m))), run.seq_len)
                * run.tokens_per_step for m in methods}
    budget = 10.5 * per_step["standard"]
    runs = sweep.sweep_runs(run, methods, 2, Budget("flops", budget))
    steps = {r.method: r.steps for r in runs}
    assert steps == {m: math.floor(budget / per_step[m]) for m in methods}
    assert steps["standard"] == 10 > steps["hyper_connections"] > steps["method1"]
    assert [dict(r.knobs).get("hc_dynamic", False) for r in runs] == [False, False, True, True, False, False]
    assert {r.steps for r in sweep.sweep_runs(run, methods, 2, Budget("steps", 7))} == {7}
    with pytest.raises(ValueError, match="buys no step"):
        sweep.sweep_runs(run, methods, 1, Budget("flops", per_step["standard"] / 2))
    with pytest.raises(ValueError, match="--decay-steps cannot be combined with --budget flops"):
        sweep.sweep_runs(run.replace(decay_steps=20), methods, 1, Budget("flops", budget))


def test_a_sweep_entry_sets_its_methods_knobs(tmp_path):
    """`METHOD:KNOB=VALUE` compares variants of one scheme in one sweep: the entry's runs (and only
    they) get the knob, their own folder, and the steps their own FLOPs buy."""
    entries = ("hyper_connections", "hyper_connections:hc_dynamic=true", "denseformer:dense_period=2:dense_dilation=2")
    run = TINY.replace(output_dir=str(tmp_path))
    budget = 5.5 * flops.flops_per_token(model_config(run), run.seq_len) * run.tokens_per_step
    runs = sweep.sweep_runs(run, entries, 1, Budget("flops", budget))
    assert [(r.method, dict(r.knobs)) for r in runs] == [
        ("hyper_connections", {}), ("hyper_connections", {"hc_dynamic": True}),
        ("denseformer", {"dense_period": 2, "dense_dilation": 2})]
    assert [sweep.entry_of(r) for r in runs] == list(entries)
    assert [r.steps for r in runs] == [math.floor(budget / (flops.flops_per_token(model_config(r), r.seq_len)
                                                            * r.tokens_per_step)) for r in runs]
    assert runs[0].steps > runs[1].steps  # the dynamic terms cost FLOPs


@pytest.mark.parametrize("entry, message", [
    ("method7", "unknown method 'method7' in sweep entry"),
    ("standard:hc_dynamic=true", r"expected KNOB=VALUE with KNOB one of standard's knobs \[\]"),
    ("hyper_connections:hc_dynamic", "bad setting 'hc_dynamic'"),
    ("hyper_connections:hc_dynamic=maybe", "bad value 'maybe' for hc_dynamic: expected true or false"),
    ("denseformer:dense_period=two", "bad value 'two' for dense_period: expected an integer")])
def test_bad_sweep_entry_says_what_is_expected(entry, message):
    with pytest.raises(ValueError, match=message):
        sweep.parse_entry(entry)


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


def test_runs_that_differ_in_seed_only_reuse_the_compiled_programs(tmp_path, small_corpus, compile_events):
    """A second run of the same model, mesh, sequence length and optimiser in one process (a
    sweep's or study's next seed) compiles no train, eval or init step again, and trains exactly
    as it does when everything is built afresh; so does a run with another learning rate and
    number of steps (the schedule is optimiser state), which trains differently."""
    from jax_residual.train import loop

    run = TINY.replace(data=str(small_corpus), seed=0, output_dir=str(tmp_path / "seed0"))
    train(plan(run))
    compile_events.clear()
    reused = train(plan(run.replace(seed=1, output_dir=str(tmp_path / "reused"))))
    assert not [e for e in compile_events if e == "/jax/core/compile/backend_compile_duration"]
    loop.programs.cache_clear()
    fresh = train(plan(run.replace(seed=1, output_dir=str(tmp_path / "fresh"))))
    assert compile_events
    assert losses(reused.records) == losses(fresh.records) and reused.records[-1]["step"] == 4
    compile_events.clear()
    faster = train(plan(run.replace(seed=1, lr=2 * run.lr, steps=6, output_dir=str(tmp_path / "faster"))))
    assert not [e for e in compile_events if e == "/jax/core/compile/backend_compile_duration"]
    train_losses = [{r["step"]: r["train_loss"] for r in result.records if "train_loss" in r} for result in (faster, fresh)]
    assert faster.records[-1]["step"] == 6 and train_losses[0][4] != train_losses[1][4]


def test_an_extended_run_decays_over_its_new_length(tmp_path, small_corpus):
    """The schedule's settings live in the checkpoint, but a resumed run takes its own: a 4-step
    run resumed with --steps 6 (no --decay-steps) saves checkpoint 6 with total_steps 6."""
    run = TINY.replace(data=str(small_corpus), output_dir=str(tmp_path))
    train(plan(run), log=lambda *_: None)
    train(plan(run.replace(steps=6)), log=lambda *_: None)
    saved = ocp.StandardCheckpointer().restore((tmp_path / "checkpoints/6/state").absolute())["opt_state"]
    schedule = {name: int(value) if "steps" in name else float(value) for name, value in saved[-1]["hyperparams"].items()}
    assert schedule == {"peak_lr": pytest.approx(run.lr), "warmup_steps": run.warmup_steps, "total_steps": 6}


@pytest.mark.parametrize("flags, message", [
    (("--method", "method7"), "invalid choice: 'method7'"),
    (("--tokenizer", "bpe:12"), "bad tokenizer 'bpe:12'"),
    (("--mesh", "data=2,tensr=2"), "tensr"),
])
def test_cli_reports_bad_flags_in_one_line(flags, message):
    run = InProcessRun([*flags, "--steps", "3"], jax.devices()[:1])
    _, err = run.communicate()
    assert run.returncode == 2 and message in one_line_error(err)
    assert flags[0] != "--method" or "method5.5" in err  # the allowed ones


def test_a_short_run_clamps_the_default_warmup_only():
    def warmup(*flags):
        return cli.run_config(cli.build_parser().parse_args(flags)).warmup_steps

    assert warmup("--steps", "5") == 2 and warmup("--steps", "120") == 10 and warmup("--steps", "11") == 10
    assert warmup("--steps", "400", "--decay-steps", "6") == 3 and warmup("--steps", "5", "--warmup-steps", "4") == 4


# ----------------------------------------------------------------------------- training runs (subprocesses, or in this process)

TINY_FLAGS = ("--preset", "tiny", "--method", "standard", "--batch-size", "8", "--seq-len", "32", "--steps", "4",
              "--warmup-steps", "1", "--eval-every", "2", "--eval-batches", "2", "--checkpoint-every", "2",
              "--sample-tokens", "0")


@pytest.fixture(scope="module")
def cli_env() -> dict:
    """Environment of the train_tpu_gpu.py subprocesses (llama_testlib.subprocess_env)."""
    return subprocess_env()


@pytest.fixture(scope="module")
def launch(cli_env, small_corpus):
    """launch(output, *flags) -> Popen of train_tpu_gpu.py with TINY_FLAGS, then `flags`."""

    def start(output: pathlib.Path, *flags: str) -> subprocess.Popen:
        command = [sys.executable, "train_tpu_gpu.py", *TINY_FLAGS, "--data", str(small_corpus),
                   "--output-dir", str(output), *flags]
        return subprocess.Popen(command, cwd=REPO, env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)

    return start


class InProcessRun:
    """train_tpu_gpu.py's `main` on `argv` and `devices`, run in this process when communicated,
    its output captured: a Popen's communicate() and returncode, for `finish`. For the runs whose
    test is not about the process itself (signals, kills, several processes, a fresh
    interpreter): no interpreter start-up, and earlier identical runs' programs are reused."""

    def __init__(self, argv: list[str], devices: list):
        self.argv, self.devices, self.returncode = argv, devices, None

    def communicate(self, timeout=None) -> tuple[str, str]:
        main = functools.partial(cli.main, after_single_run=sample.print_final_sample, devices=self.devices)
        self.returncode, out, err = in_process(main, self.argv)
        return out, err


@pytest.fixture(scope="module")
def run_here(small_corpus):
    """run_here(output, *flags) -> InProcessRun of TINY_FLAGS, then `flags`: on this process's
    first device, like `launch`'s one-device subprocess, or on all 8 when `flags` name a mesh."""

    def start(output: pathlib.Path, *flags: str) -> InProcessRun:
        devices = jax.devices() if "--mesh" in flags else jax.devices()[:1]
        return InProcessRun([*TINY_FLAGS, "--data", str(small_corpus), "--output-dir", str(output), *flags], devices)

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
def reference_folder(run_here, tmp_path_factory) -> pathlib.Path:
    """The tiny standard run on one device: what the other layouts must reproduce."""
    folder = tmp_path_factory.mktemp("reference")
    train_runs(run_here, (folder,))
    return folder


@pytest.fixture(scope="module")
def reference(reference_folder) -> list[dict]:
    return read_records(reference_folder / "metrics.jsonl")


def test_bfloat16_training_through_the_cli(tmp_path, run_here):
    """`--dtype bfloat16` trains on this CPU (XLA:CPU has no BF16 x BF16 -> F32 dot, which the
    attention backward used to ask for) for the standard model and a method that re-runs
    earlier layers. How close bf16 stays to fp32: test_mixed_precision.py."""
    methods = ("standard", "method1")
    runs = train_runs(run_here, *((tmp_path / m, "--method", m, "--dtype", "bfloat16") for m in methods))
    for method, records in zip(methods, runs):
        assert [r["step"] for r in records] == [0, 1, 2, 3, 4]
        assert all(math.isfinite(r[key]) for r in records for key in LOSS_KEYS if key in r)
        assert records[-1]["train_loss"] < records[1]["train_loss"]
        assert json.loads((tmp_path / method / "config.json").read_text())["model"]["dtype"] == "bfloat16"


@pytest.mark.slow
@pytest.mark.parametrize("method", ["standard", "method1", "method5.2"])
def test_data4_tensor2_mesh_matches_one_device(method, tmp_path, run_here, reference):
    sharded_run = (tmp_path / "eight", "--method", method, "--mesh", "data=4,tensor=2")
    if method == "standard":  # the reference is this one-device run
        (sharded,), single = train_runs(run_here, sharded_run), reference
    else:
        single, sharded = train_runs(run_here, (tmp_path / "one", "--method", method), sharded_run)
    assert_close_records(sharded, single, RTOL)
    assert single[-1]["train_loss"] < single[1]["train_loss"] and "val_loss" in single[-1]
    config = json.loads((tmp_path / "eight/config.json").read_text())
    assert config["mesh"] == {"data": 4, "fsdp": 1, "tensor": 2} and len(config["devices"]) == 8


# An honest byte-level model of this size cannot get near this after 60 steps: measured on this
# run, train loss >= 2.53 at every step and final validation loss 3.28 nats/byte. A target that
# leaks into the input is learnt as a copy instead: with the train step predicting its own input
# (tokens[:, :-1]) the same run fell to train 0.31 (minimum) and validation 0.45.
LEAK_FLOOR = 1.5


@pytest.mark.slow
def test_honest_short_run_stays_above_the_leak_floor(tmp_path, run_here):
    """60 real steps of the tiny model (lr 1e-2) through train_tpu_gpu.py: no training loss and
    no validation loss falls below LEAK_FLOOR nats/byte, which only a leak of the target (or of
    later tokens) into what the model reads lets it reach."""
    records, = train_runs(run_here, (tmp_path, "--steps", "60", "--lr", "1e-2", "--eval-every", "20",
                                   "--checkpoint-every", "60"))
    train_losses = [r["train_loss"] for r in records if "train_loss" in r]
    val_losses = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(train_losses) == 60 and len(val_losses) == 4
    assert min(train_losses) > LEAK_FLOOR and min(val_losses) > LEAK_FLOOR, (train_losses, val_losses)
    assert train_losses[-1] < train_losses[0] - 1.0  # and it did learn


@pytest.mark.slow
def test_checkpoint_from_8_devices_resumes_on_1(tmp_path, run_here, reference):
    train_runs(run_here, (tmp_path, "--steps", "2", "--decay-steps", "4", "--mesh", "data=4,tensor=2"))
    assert finished_checkpoints(tmp_path) == [2]
    (out, _), = finish(run_here(tmp_path, "--decay-steps", "4"))  # 1 device, the same schedule
    assert "resuming from step 2" in out and "over 1 cpu device" in out
    assert_close_records(read_records(tmp_path / "metrics.jsonl"), reference, RTOL)


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, run_here):
    (_, err), = finish(run_here(tmp_path, "--inject-nan-at", "2"), returncode=3)
    assert "non-finite training loss (nan)" in err and "at step 3" in err and "last good checkpoint is step 2" in err
    assert finished_checkpoints(tmp_path) == [2]
    records = read_records(tmp_path / "metrics.jsonl")
    assert records[-1]["step"] == 3 and "non-finite" in records[-1]["error"]
    (out, _), = finish(run_here(tmp_path))  # the same run without the fault resumes from step 2
    assert "resuming from step 2" in out and finished_checkpoints(tmp_path) == [2, 4]
    records = read_records(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4] and math.isfinite(records[-1]["val_loss"])


@pytest.mark.slow
def test_sigkill_mid_training_resumes_to_the_same_metrics(tmp_path, launch):
    # 40 steps on the tiny run's schedule (--decay-steps 4): the same compiled program; killed
    # after step 13 at the earliest, 27 steps before the end
    flags = ("--steps", "40", "--decay-steps", "4", "--eval-every", "20", "--checkpoint-every", "10")
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
    assert 0 < saved < killed_at < 40

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
def test_sweep_writes_table_curves_and_learned_weights(tmp_path, run_here):
    """... and attn_res: input-dependent weights, plotted as their mean over the validation tokens."""
    methods = ("standard", "method4.2", "method5.5", "attn_res")
    (out, _), = finish(run_here(tmp_path, "--sweep", ",".join(methods), "--seeds", "2"))
    assert "| method4.2 | 2 |" in out
    table = json.loads((tmp_path / "sweep.json").read_text())["rows"]
    assert [row["method"] for row in table] == list(methods)
    standard = table[0]["final_val_loss"]
    for row in table:  # the table against each run's own metrics, and against numpy/scipy
        assert row["seeds"] == [0, 1] and row["mean"] == pytest.approx(np.mean(row["final_val_loss"]))
        assert row["std"] == pytest.approx(np.std(row["final_val_loss"], ddof=1))
        curves = plots.validation_curves(
            {row["method"]: {s: read_records(tmp_path / row["method"] / f"seed{s}/metrics.jsonl") for s in (0, 1)}})
        assert [curves[row["method"]][s][1][-1] for s in (0, 1)] == row["final_val_loss"]
        if row["method"] != "standard":
            p_value = scipy.stats.ttest_ind(row["final_val_loss"], standard, equal_var=False).pvalue
            assert row["p_vs_standard"] == pytest.approx(p_value, rel=1e-9)
    assert "± " in (tmp_path / "sweep.md").read_text()
    for method in methods:  # one data order for all runs, the seed changes the initial parameters
        configs = [json.loads((tmp_path / method / f"seed{s}/config.json").read_text())["run"] for s in (0, 1)]
        assert [c["data_seed"] for c in configs] == [0, 0] and [c["seed"] for c in configs] == [0, 1]

    learned = json.loads((tmp_path / "learned_weights.json").read_text())
    assert set(learned) == {"method4.2", "method5.5", "attn_res"}
    weights = np.array(learned["method4.2"]["per_seed"]["0"]["weights"])
    layers = weights.shape[0]
    assert weights.shape == (layers, layers) and layers == model_config(TINY).num_hidden_layers
    np.testing.assert_allclose(weights[1:].sum(axis=1), 1.0, rtol=1e-6)  # a softmax over the earlier layers
    assert np.all(np.triu(weights) == 0)
    assert np.all(np.triu(np.array(learned["method5.5"]["mean_weights"]), 1) == 0)  # layers <= l only
    for name in ("val_curves.png", "learned_weights.png"):
        assert (tmp_path / name).stat().st_size > 10_000
    for seed in (0, 1):  # attn_res: the observed mean softmax weights of each evaluation, the last one plotted
        records = [r for r in read_records(tmp_path / f"attn_res/seed{seed}/metrics.jsonl") if "val_loss" in r]
        observed = [np.array(r["observed_depth_weights"]) for r in records if "observed_depth_weights" in r]
        assert len(observed) == 2 and observed[-1].shape == (2 * layers, 2 * layers + 1)
        np.testing.assert_allclose(observed[-1].sum(axis=1), 1.0, rtol=1e-6)
        assert np.all(np.triu(observed[-1], 2) == 0) and not np.allclose(observed[0], observed[-1])
        np.testing.assert_array_equal(learned["attn_res"]["per_seed"][str(seed)]["weights"], observed[-1])
    for method in ("method4.2", "attn_res"):
        images = tensorboard_events(tmp_path / f"{method}/seed0")[f"connection_weights/{method}"]
        assert images == [(2, "image"), (4, "image")]  # at each evaluation
    assert_events_stay_small(tmp_path / "method4.2/seed0", 4)


@pytest.mark.slow
def test_init_from_hf_starts_from_the_checkpoints_weights(tmp_path, run_here, reference_folder, reference):
    """Save the reference run's final weights as an HF Llama folder and start a run from it: its
    step-0 validation loss is the reference's final one (the same weights on the same data)."""
    state = ocp.StandardCheckpointer().restore((reference_folder / "checkpoints/4/state").absolute())
    hf_folder = tmp_path / "hf"
    save_hf_checkpoint(state["params"], model_config(TINY), hf_folder)
    assert (hf_folder / "model.safetensors").exists()
    records, = train_runs(run_here, (tmp_path / "run", "--init-from-hf", str(hf_folder), "--steps", "2",
                                   "--decay-steps", "4"))
    assert records[0]["step"] == 0 and records[-1]["step"] == 2
    np.testing.assert_allclose(records[0]["val_loss"], reference[-1]["val_loss"], rtol=RTOL)


# ----------------------------------------------------------------------------- damage and bad paths


def one_line_error(err: str) -> str:
    """The single stderr line of a run that refused to start (no traceback)."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


@pytest.mark.slow
def test_unreadable_latest_checkpoint_is_reported_and_an_older_one_resumed(tmp_path, run_here, reference_folder,
                                                                          reference):
    run = tmp_path / "run"
    shutil.copytree(reference_folder, run)
    for path in (run / "checkpoints/4").rglob("*"):
        if path.is_file():
            path.write_bytes(b"")  # every file of step 4 emptied
    (out, err), = finish(run_here(run))
    warnings = [line for line in err.splitlines() if "checkpoint 4" in line]
    assert len(warnings) == 1 and "cannot be read (" in warnings[0] and "unreadable_checkpoints/4" in warnings[0]
    assert "resuming from step 2" in out
    assert_close_records(read_records(run / "metrics.jsonl"), reference, RTOL)
    assert finished_checkpoints(run) == [2, 4] and (run / "unreadable_checkpoints/4/state").is_dir()  # kept


@pytest.mark.slow
def test_bad_paths_fail_in_one_line_with_status_2(tmp_path, run_here, reference_folder):
    corrupt = tmp_path / "corrupt_hf"
    corrupt.mkdir()
    save_hf_checkpoint(ocp.StandardCheckpointer().restore((reference_folder / "checkpoints/4/state").absolute())
                       ["params"], model_config(TINY), corrupt)
    (corrupt / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": [1, 2, 3]}")
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    cases = {
        ("--init-from-hf", str(tmp_path / "nonexistent")): "--init-from-hf: checkpoint folder",
        ("--init-from-hf", str(corrupt)): "model.safetensors is not a readable safetensors file",
        ("--data", str(tmp_path / "no_data")): "no such file or folder",
        ("--output-dir", str(a_file)): "is a file, not a folder",
    }
    processes = [run_here(tmp_path / f"run{i}", *flags) for i, flags in enumerate(cases)]
    for (_, err), message in zip(finish(*processes, returncode=2), cases.values()):
        assert message in one_line_error(err)


# ----------------------------------------------------------------------------- tokenizers, export

BPE_FLAGS = ("--tokenizer", "bpe:384", "--decay-steps", "4")


@pytest.fixture(scope="module")
def bpe_folder(run_here, tmp_path_factory) -> tuple[pathlib.Path, str]:
    """(folder, its tokenizer.json) of a bpe:384 run trained to step 2 (its schedule ends at step 4)."""
    folder = tmp_path_factory.mktemp("bpe")
    finish(run_here(folder, *BPE_FLAGS, "--steps", "2"))
    return folder, (folder / "tokenizer.json").read_text()


def tensorboard_events(folder: pathlib.Path) -> dict[str, list[tuple[int, str]]]:
    """tag -> [(step, kind of value)] of the folder's TensorBoard event files, read as TFRecords
    (u64 length, u32 crc, the Event proto, u32 crc) with tensorboardX's own proto."""
    from tensorboardX.proto import event_pb2

    found = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        raw, offset = path.read_bytes(), 0
        while offset < len(raw):
            length, = struct.unpack("<Q", raw[offset:offset + 8])
            event = event_pb2.Event.FromString(raw[offset + 12:offset + 12 + length])
            offset += 16 + length
            for value in event.summary.value:
                found.setdefault(value.tag, []).append((event.step, value.WhichOneof("value")))
    return found


def test_tensorboard_log_leaves_torch_unimported(tmp_path, cli_env):
    """The event writer does not pull in torch (tensorboardX's writer imports it whenever it is
    installed); torch still imports afterwards in the same process."""
    code = ("import pathlib, sys\n"
            "from jax_residual.train.tensorboard import TensorBoardLog\n"
            "log = TensorBoardLog(pathlib.Path(sys.argv[1]), True, None)\n"
            "log.scalars({'step': 0, 'train_loss': 1.5})\n"
            "log.close()\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n"
            "import torch\n"
            "print('ok', torch.__version__)\n")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=REPO, env=cli_env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.startswith("ok"), result.stderr[-3000:]
    assert tensorboard_events(tmp_path) == {"train_loss": [(0, "simple_value")]}


def test_tensorboard_events_hold_the_metrics(reference_folder, reference):
    events = tensorboard_events(reference_folder)
    for tag in ("train_loss", "val_loss", "val_bpb", "lr", "grad_norm", "tokens_per_s"):
        assert events[tag] == [(r["step"], "simple_value") for r in reference if tag in r], tag


# A scalar event is ~50 bytes (TFRecord framing 16, wall time 9, step 2-3, tag and float ~25); a
# step's record holds 6-8 scalars (the 120-step default run: 289 bytes a step), and the learned
# weights' image (a few hundred bytes of PNG) comes at evaluations only. 1 KB a step leaves room for
# a few more metrics; a histogram or an image per parameter per step is several KB a step.
EVENT_BYTES_PER_STEP = 1024


def assert_events_stay_small(folder: pathlib.Path, steps: int):
    size = sum(path.stat().st_size for path in folder.glob("events.out.tfevents.*"))
    assert 0 < size <= EVENT_BYTES_PER_STEP * steps, f"{size} bytes of TensorBoard events for {steps} steps"


def test_tensorboard_events_grow_by_under_a_kilobyte_a_step(reference_folder, reference):
    assert_events_stay_small(reference_folder, reference[-1]["step"])


def test_val_bpb_of_a_bytes_run_is_val_loss_over_ln2(reference):
    evals = [r for r in reference if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 2, 4]
    for r in evals:
        assert r["val_bpb"] == pytest.approx(r["val_loss"] / math.log(2), rel=1e-12)


@pytest.mark.slow
def test_bpe_run_saves_its_tokenizer_and_resumes_with_it(run_here, bpe_folder):
    folder, first_tokenizer = bpe_folder
    (out, _), = finish(run_here(folder, *BPE_FLAGS))
    assert "resuming from step 2" in out and "tokenizer bpe:384" in out
    assert (folder / "tokenizer.json").read_text() == first_tokenizer  # reused, not retrained
    config = json.loads((folder / "config.json").read_text())
    assert config["model"]["vocab_size"] == 384 and config["tokenizer"] == {"name": "bpe:384", "vocab_size": 384,
                                                                           "eos_id": 0}
    per_byte = config["corpus"]["validation_tokens_per_byte"]
    assert 0.2 < per_byte < 0.9  # BPE tokens span several bytes
    evals = [r for r in read_records(folder / "metrics.jsonl") if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 2, 4] and evals[-1]["val_loss"] < evals[0]["val_loss"]
    for r in evals:
        assert r["val_bpb"] == pytest.approx(r["val_loss"] * per_byte / math.log(2), rel=1e-12)


@pytest.mark.slow
def test_export_cli_writes_the_runs_checkpoint_and_tokenizer(tmp_path, bpe_folder):
    folder, first_tokenizer = bpe_folder
    out = tmp_path / "hf"
    status, _, err = in_process(export.main, [str(folder), str(out), "--step", "2"])
    assert status == 0, err[-3000:]
    hf_config = json.loads((out / "config.json").read_text())
    assert hf_config["architectures"] == ["LlamaForCausalLM"] and hf_config["eos_token_id"] == 0
    assert (out / "tokenizer.json").read_text() == first_tokenizer
    modes = {path.name: path.stat().st_mode & 0o777 for path in out.iterdir()}
    assert modes["model.safetensors"] == modes["config.json"], modes  # not safetensors' own 0600
    cfg, params = load_hf_checkpoint(out)
    saved = ocp.StandardCheckpointer().restore((folder / "checkpoints/2/state").absolute())["params"]
    assert cfg.residual_method == "standard" and cfg.vocab_size == 384
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, params), jax.tree.map(np.asarray, saved))

    status, _, err = in_process(export.main, [str(folder), str(out), "--step", "3"])
    assert status == 2 and "--step 3: no checkpoint of that step" in one_line_error(err)


def test_sample_cli_prints_continuations_with_the_runs_tokenizer(bpe_folder, tmp_path):
    """`python -m jax_residual.sample` on a BPE run: greedy samples of one prompt are identical,
    start with the prompt and are decoded text; a missing run folder is one line, status 2."""
    folder, _ = bpe_folder
    status, out, err = in_process(sample.main, [str(folder), "--prompt", "def ", "--count", "2", "--temperature", "0",
                                                "--max-new-tokens", "6"])
    assert status == 0, err[-3000:]
    samples = out.split("--- sample ---\n")[1:]
    assert len(samples) == 2 and samples[0] == samples[1] and samples[0].startswith("def "), out
    status, _, err = in_process(sample.main, [str(tmp_path / "missing")])
    assert status == 2 and "does not exist" in one_line_error(err)


def test_a_single_run_ends_by_printing_a_sample(tmp_path, run_here):
    (stdout, _), = finish(run_here(tmp_path / "run", "--sample-tokens", "8"))
    assert "sample (temperature 0.8, top-k 40" in stdout and "python -m jax_residual.sample" in stdout


@pytest.mark.slow
def test_flops_budget_sweep_of_the_schemes_resumes_without_retraining(tmp_path, cli_env, small_corpus, run_here):
    """Every published scheme (docs/maths.md C) trains from the command line in a FLOP-matched sweep. The sweep is
    killed when its fifth run starts; rerunning the same command restores the four finished runs
    (their metrics untouched, their learned weights those of their last checkpoint), trains the
    rest, and tabulates all of them: steps, FLOP ratios, tokens/s, p-values."""
    methods = ("standard", "denseformer", "value_residual", "hyper_connections", "mhc")
    run = TINY.with_knobs(hc_dynamic=True)
    per_step = {m: flops.flops_per_token(model_config(sweep.own_knobs(run.replace(method=m))), run.seq_len)
                * run.tokens_per_step for m in methods}
    budget = 4.2 * per_step["standard"]
    flags = ("--sweep", ",".join(methods), "--seeds", "2", "--budget", f"flops={budget!r}", "--hc-dynamic")
    command = [sys.executable, "train_tpu_gpu.py", *TINY_FLAGS, "--data", str(small_corpus), "--output-dir",
               str(tmp_path), *flags]
    first = subprocess.Popen(command, cwd=REPO, env={**cli_env, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)
    for line in first.stdout:  # blocks on the child's output: no polling
        if line.startswith("=== sweep run 5/10"):
            break
    first.kill()
    first.communicate()
    finished = {(m, s): (tmp_path / m / f"seed{s}/metrics.jsonl").read_bytes()
                for m in ("standard", "denseformer") for s in (0, 1)}

    (out, _), = finish(run_here(tmp_path, *flags))  # the same command line, in this process
    for (method, seed), metrics in finished.items():
        assert (tmp_path / method / f"seed{seed}/metrics.jsonl").read_bytes() == metrics, (method, seed)
    expected_steps = {m: math.floor(budget / per_step[m]) for m in methods}
    assert out.count(f"resuming from step {expected_steps['standard']}") >= 4
    rows = {row["method"]: row for row in json.loads((tmp_path / "sweep.json").read_text())["rows"]}
    assert list(rows) == list(methods)
    for method, row in rows.items():
        assert row["steps"] == [expected_steps[method]] and row["seeds"] == [0, 1] and row["tokens_per_s"] > 0
        assert row["flops_ratio"] == pytest.approx(per_step[method] / per_step["standard"])
        assert (row["p_vs_standard"] is None) == (method == "standard") and all(map(math.isfinite, row["final_val_loss"]))
    assert expected_steps["standard"] == 4 > expected_steps["mhc"]
    learned = json.loads((tmp_path / "learned_weights.json").read_text())
    for seed in (0, 1):  # restored from the checkpoint: the weights logged at the run's last step
        last = read_records(tmp_path / "denseformer" / f"seed{seed}/metrics.jsonl")[-1]
        np.testing.assert_array_equal(learned["denseformer"]["per_seed"][str(seed)]["params"]["dense_weights"],
                                      last["dense_weights"])
    assert learned["hyper_connections"]["mean_weights"] is None and "hc_dynamic_alpha" in \
        learned["hyper_connections"]["per_seed"]["0"]["params"]
    assert (tmp_path / "val_curves.png").stat().st_size > 10_000
