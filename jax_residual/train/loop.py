"""`train(run)`: one training run, from (or resuming to) step `run.steps`.

Output folder (process 0 writes; every process takes part in checkpoints):
  config.json      the run, the model, the tokenizer, the mesh, the corpus, the FLOP estimate
  tokenizer.json   the run's tokenizer (not for bytes), a copy of its prepared corpus's
  data/            the prepared corpus of a raw --data source (train/corpus.py); a resumed run reuses it
  metrics.jsonl    one record per step (see metrics.py); eval steps add val_loss, val_bpb, the
                   connection weights and, for a scheme whose depth weights depend on the tokens,
                   their mean over the validation tokens (observed_depth_weights)
  events.out.tfevents.*  the same numbers and the depth matrix (`depth_matrix`) for TensorBoard
  checkpoints/     orbax, the last `keep_checkpoints` steps
  loss_curve.png   train and validation loss

Longer than the package's other modules (~380 lines) because it is where a run's pieces meet:
the plan and its checks, resuming, the step loop with its evaluations, checkpoints and fault
handling; each piece is a small function here or a module of its own (checkpoint.py, faults.py,
corpus.py, step.py).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from jax_residual import LlamaForCausalLM, ModelConfig
from jax_residual.convert import load_hf_checkpoint
from jax_residual.connections import weight_names
from jax_residual.sharding import make_mesh, parse_mesh_shape
from jax_residual.data.shards import PreparedCorpus
from jax_residual.data import tokenizer
from jax_residual.train import checkpoint, corpus as run_corpus, data, faults, flops, optim, plots, step
from jax_residual.train.metrics import MetricsLog, finite_or_text, last_value
from jax_residual.train.run_config import RunConfig, check, identity, model_config, output_dir
from jax_residual.train.tensorboard import TensorBoardLog


class NonFiniteLoss(RuntimeError):
    """Training produced a non-finite loss or gradient norm; the run stopped without saving."""


@dataclasses.dataclass
class RunResult:
    output_dir: pathlib.Path
    step: int
    final_train_loss: float | None
    final_val_loss: float | None  # nats/token
    final_val_bpb: float | None  # bits/byte
    tokens_per_s: float | None  # steady state: steps after this invocation's first (compiling) one
    flops_per_token: float  # model FLOPs (flops.py)
    num_params: int
    mfu: float | None
    wall_s: float
    records: list[dict]
    method_params: dict[str, np.ndarray]  # learned residual-method weights, host copies
    depth_weights: np.ndarray | None  # its depth matrix after the last step (`depth_matrix`), None: none


# ----------------------------------------------------------------------------- checking a run


@dataclasses.dataclass(frozen=True)
class Plan:
    """A checked run: everything `train` needs, settled before anything compiles."""

    run: RunConfig
    folder: pathlib.Path
    corpus: PreparedCorpus  # token streams of `tokenizer`
    tokenizer: tokenizer.RunTokenizer
    cfg: ModelConfig
    host_params: dict | None  # from --init-from-hf
    mesh: jax.sharding.Mesh


def plan(run: RunConfig, devices=None) -> Plan:
    """Check `run` against its data, model and `devices` (default: all) and settle its mesh.

    Raises ValueError naming every problem; compiles nothing.
    """
    devices = list(jax.devices() if devices is None else devices)
    folder = output_dir(run)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--output-dir {folder} is a file, not a folder")
    try:
        (cfg, host_params), model_problems = resolve_model(run), ()
    except ValueError as error:  # the model config names what is allowed
        (cfg, host_params), model_problems = (None, None), (str(error),)
    check_same_run(folder, run)
    mesh_shape = parse_mesh_shape(run.mesh or f"data={len(devices)}")
    check(run, cfg, mesh_shape, len(devices), model_problems)  # the flags, before any data is prepared
    corpus, tok = run_corpus.run_corpus(run.data, run.tokenizer, run.init_from_hf, folder)
    if not (run.init_from_hf or run.tokenizer):  # a preset model takes the prepared corpus's vocabulary
        cfg = cfg.replace(vocab_size=tok.vocab_size)
    check(run, cfg, mesh_shape, len(devices), tokenizer_vocab=(tok.name, tok.vocab_size))
    for name in ("train", "validation"):
        data.check_stream(corpus.splits[name], name, run.seq_len, corpus.description)
    return Plan(run, folder, corpus, tok, cfg, host_params, make_mesh(mesh_shape, devices))


def resolve_model(run: RunConfig) -> tuple[ModelConfig, dict | None]:
    """(model config, host params) from --init-from-hf, else (preset config, None)."""
    if run.init_from_hf:
        try:
            return load_hf_checkpoint(run.init_from_hf, residual_method=run.method, dtype=run.dtype, remat=run.remat,
                                      **dict(run.knobs))
        except ValueError as error:
            raise ValueError(f"--init-from-hf: {error}") from None
    return model_config(run), None


def check_same_run(folder: pathlib.Path, run: RunConfig):
    """Refuse to resume a folder that holds a different run (other model, data, seed, ...)."""
    saved = folder / "config.json"
    if not saved.exists():
        return
    before = json.loads(saved.read_text())["identity"]
    now = json.loads(json.dumps(identity(run)))
    changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
    if changed:
        details = ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed)
        raise ValueError(f"{folder} holds a different run ({details}); pass another --output-dir "
                         f"or the same settings to resume it")


# ----------------------------------------------------------------------------- pieces of a run


def host_value(array: jax.Array):
    """A replicated array's value on the host (works when other processes hold copies too)."""
    return np.asarray(array.addressable_data(0))


@dataclasses.dataclass
class Throughput:
    """Tokens and seconds of the timed steps: all but an invocation's first (it compiles)."""

    tokens: int = 0
    seconds: float = 0.0

    def add(self, tokens: int, seconds: float):
        self.tokens, self.seconds = self.tokens + tokens, self.seconds + seconds

    @property
    def tokens_per_s(self) -> float | None:
        return self.tokens / self.seconds if self.seconds else None


@dataclasses.dataclass(frozen=True)
class Programs:
    """A run's state layout and jitted functions (train/step.py), which depend on its
    model, mesh, sequence length and optimiser settings only: not on its seed, data or folder."""

    shardings: step.TrainState
    abstract_state: step.TrainState
    init_params: Callable  # jit(key) -> params
    init_state: Callable  # jit(params) -> state at step 0
    train_step: Callable
    eval_step: Callable
    depth_step: Callable  # compiled if called


@functools.lru_cache(maxsize=4)
def programs(cfg: ModelConfig, mesh: jax.sharding.Mesh, seq_len: int, weight_decay: float,
             grad_clip: float) -> Programs:
    """The Programs of a run, built once per process for each (model, mesh, sequence length,
    weight decay, gradient clip): the runs of a sweep or study that differ in seed, learning rate
    or steps only reuse the compiled functions instead of tracing and compiling the same programs
    again (the schedule's settings are optimiser state: `initial_state` sets the run's). The last
    few settings are kept."""
    tx = optim.make_optimizer(1.0, 0, 1, weight_decay, grad_clip)  # schedule settings: the run's, set later
    shardings, abstract_state = step.state_shardings(mesh, cfg, tx, seq_len)
    model = LlamaForCausalLM(cfg, mesh=mesh)
    return Programs(shardings, abstract_state, step.make_init_params(cfg, seq_len, shardings.params),
                    step.make_init_state(tx, shardings), step.make_train_step(model, tx, shardings, mesh),
                    step.make_eval_step(model, shardings.params, mesh),
                    step.make_depth_weights_step(model, shardings.params, mesh))


def initial_state(p: Plan, compiled: Programs, manager, warn=print) -> tuple[step.TrainState, bool]:
    """(state, resumed): the newest readable checkpoint restored onto this mesh (unreadable newer
    ones are reported through `warn` and moved to unreadable_checkpoints/), else step 0 (random
    params, or --init-from-hf's); either way with the run's learning rate and schedule steps."""
    run = p.run
    restored = checkpoint.restore_newest_readable(manager, compiled.abstract_state, warn)
    if restored is None:
        params = (compiled.init_params(jax.random.key(run.seed)) if p.host_params is None
                  else step.place_params(p.host_params, compiled.shardings.params))
        state, resumed = compiled.init_state(params), False
    else:
        latest, state, meta = restored
        if (meta["data_seed"], meta["data_position"]) != (run.batch_seed, latest):
            raise ValueError(f"checkpoint {latest} in {p.folder} continues data seed {meta['data_seed']} at position "
                             f"{meta['data_position']}, not seed {run.batch_seed} at {latest}")
        resumed = True
    opt_state = optim.with_schedule(state.opt_state, run.lr, run.warmup_steps, run.schedule_steps)
    return state.replace(opt_state=opt_state), resumed


def header(p: Plan, num_params: int, start: int, resumed: bool) -> str:
    """What the run is, on what, from where."""
    cfg, devices = p.cfg, list(p.mesh.devices.flat)
    return "\n".join([
        f"output: {p.folder.absolute()}",
        f"model: {cfg.residual_method}, {num_params / 1e6:.2f}M params, {cfg.num_hidden_layers} layers x "
        f"{cfg.hidden_size} hidden; mesh {dict(p.mesh.shape)} over {len(devices)} {devices[0].platform} device(s), "
        f"{jax.process_count()} process(es)",
        f"data: {p.corpus.description} ({len(p.corpus.train):,} / {len(p.corpus.validation):,} tokens)",
        f"{f'resuming from step {start}' if resumed else 'starting'}; training to step {p.run.steps}",
    ])


def step_record(done: int, out: dict[str, float], lr: float, tokens: int, seconds: float,
                flops_per_token: float, peak: float | None) -> dict:
    """The metrics record of optimiser step `done` (1-based) from the train step's outputs."""
    record = {"step": done, "train_loss": out["loss"], "grad_norm": out["grad_norm"], "param_norm": out["param_norm"],
              "lr": lr, "tokens_per_s": tokens / seconds, "tflops_per_s": tokens * flops_per_token / seconds / 1e12}
    if peak:
        record["mfu"] = tokens * flops_per_token / seconds / peak
    return record


def non_finite(done: int, out: dict[str, float], last_saved: int | None, folder: pathlib.Path) -> NonFiniteLoss:
    """The error for a step whose loss, gradient norm or updated parameters are not finite."""
    saved = (f"the last good checkpoint is step {last_saved} in {folder / 'checkpoints'} (lower --lr and rerun "
             "to resume from it)" if last_saved is not None else "no checkpoint had been saved yet")
    return NonFiniteLoss(f"non-finite training loss ({out['loss']}), gradient norm ({out['grad_norm']}) or "
                         f"parameter norm ({out['param_norm']}) at step {done}: run stopped and nothing was saved "
                         f"after it; {saved}.")


def describe(run: RunConfig, cfg: ModelConfig, mesh, corpus: PreparedCorpus, tok: tokenizer.RunTokenizer,
             num_params: int) -> dict:
    """The content of config.json."""
    return {
        "run": dataclasses.asdict(run),
        "identity": identity(run),
        "model": dataclasses.asdict(cfg),
        "tokenizer": {"name": tok.name, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id},
        "num_params": num_params,
        "flops_per_token": flops.flops_per_token(cfg, run.seq_len),
        "mesh": dict(mesh.shape),
        "devices": [str(d) for d in mesh.devices.flat],
        "processes": jax.process_count(),
        "corpus": {"description": corpus.description, "prepared": str(corpus.folder),
                   "train_tokens": len(corpus.train), "validation_tokens": len(corpus.validation),
                   "validation_tokens_per_byte": corpus.validation_tokens_per_byte},
        "jax_version": jax.__version__,
    }


def method_params(params) -> dict[str, np.ndarray]:
    """Host copies of the learned residual-method weights (replicated, so any shard is whole)."""
    layers = params["layers"]
    return {name: host_value(layers[name]) for name in sorted(weight_names() & layers.keys())}


def depth_matrix(cfg: ModelConfig, learned: dict[str, np.ndarray], observed) -> np.ndarray | None:
    """What the plots show of the method's connection weights: where its depth weights depend on
    the tokens (`Connection.observes_weights`), their mean over the validation tokens,
    observed() (train/step.make_depth_weights_step); else the (layer, earlier layer / block)
    matrix of its learned weights (`Connection.learned_matrix`); None where they form none."""
    if cfg.scheme.observes_weights(cfg):
        return np.asarray(observed(), np.float64)
    return cfg.scheme.learned_matrix(learned, cfg) if learned else None


def log_depth_matrix(board: TensorBoardLog, cfg: ModelConfig, matrix: np.ndarray | None, step: int):
    """The depth matrix (`depth_matrix`) as an image."""
    if matrix is not None:
        board.weights(f"connection_weights/{cfg.residual_method}", matrix, step)


def checkpoint_meta(run: RunConfig, done: int) -> dict:
    """The "meta" item of the checkpoint after step `done`: where the data stream continues."""
    return {"step": done, "data_seed": run.batch_seed, "data_position": done, "init_seed": run.seed}


def poisoned(state: step.TrainState) -> step.TrainState:
    """Fault injection (--inject-nan-at): the same state with NaN params."""
    return state.replace(params=jax.tree.map(lambda p: p * jnp.nan, state.params))


# ----------------------------------------------------------------------------- the run


def train(p: Plan, log=print) -> RunResult:
    """Train to step run.steps, resuming from the latest checkpoint in the run's folder.

    Raises NonFiniteLoss if the loss or gradient norm stops being finite, faults.Preempted after
    saving the step in progress on SIGTERM/SIGINT, faults.PeerLost when another process of the
    run is lost, checkpoint.SaveFailed when a checkpoint cannot be written.
    """
    started = time.perf_counter()
    run, folder, corpus, cfg, mesh = p.run, p.folder, p.corpus, p.cfg, p.mesh
    writer = jax.process_index() == 0
    compiled = programs(cfg, mesh, run.seq_len, run.weight_decay, run.grad_clip)
    schedule = optim.learning_rate(run.lr, run.warmup_steps, run.schedule_steps)
    warn = (lambda line: print(line, file=sys.stderr)) if writer else (lambda line: None)
    for name in checkpoint.remove_partial_saves(folder / "checkpoints"):
        warn(f"removed {name} in {folder / 'checkpoints'}: the partial files of a save that failed or was killed")
    manager = checkpoint.open_manager(folder / "checkpoints", run.keep_checkpoints)
    state, resumed = initial_state(p, compiled, manager, warn)
    start = int(host_value(state.step))

    num_params = sum(math.prod(a.shape) for a in jax.tree.leaves(compiled.abstract_state.params))
    flops_per_token = flops.flops_per_token(cfg, run.seq_len)
    peak = flops.peak_flops_per_second(mesh.devices.flat[0].device_kind, mesh.devices.size, run.peak_tflops)
    if writer:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(describe(run, cfg, mesh, corpus, p.tokenizer, num_params),
                                                       indent=2))
        if p.tokenizer.tokenizer is not None and not (folder / tokenizer.TOKENIZER_FILE).exists():
            p.tokenizer.tokenizer.save(str(folder / tokenizer.TOKENIZER_FILE))
        log(header(p, num_params, start, resumed))

    train_step, eval_step, depth_step = compiled.train_step, compiled.eval_step, compiled.depth_step
    batch_sharding = step.stacked_batch_sharding(mesh)
    validation = data.global_batch_array(
        data.validation_batches(corpus.validation, run.eval_batches, run.batch_size, run.seq_len), batch_sharding, 1)
    batches = data.train_batches(corpus.train, run.batch_seed, start, run.steps, run.batch_size, run.seq_len,
                                 run.grad_accum, batch_sharding)

    def evaluate(params) -> dict:
        """val_loss (nats/token) and val_bpb (bits per byte of text)."""
        loss = float(host_value(eval_step(params, validation)))
        bpb = tokenizer.bits_per_byte(loss, corpus.validation_tokens_per_byte)
        return {"val_loss": finite_or_text(loss), "val_bpb": finite_or_text(bpb)}

    def weights_of(params) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
        """(the learned connection weights, the depth matrix) of params, on the validation batches."""
        learned = method_params(params)
        return learned, depth_matrix(cfg, learned, lambda: host_value(depth_step(params, validation)))

    metrics = MetricsLog(folder / "metrics.jsonl", start if resumed else None, writer)
    board = TensorBoardLog(folder, writer, purge_from=start)
    if start == 0:
        metrics.write({"step": 0, **evaluate(state.params)})
        board.scalars(metrics.records[-1])
    speed = Throughput()
    bar = tqdm.tqdm(total=run.steps, initial=start, desc=cfg.residual_method, unit="step", disable=not writer,
                    dynamic_ncols=True)
    stop, index = faults.StopRequest(), start
    last_weights = None  # weights_of the params of the last evaluation (the final params if the loop ran)
    restore_signals = stop.install()
    try:
        for index in range(start, run.steps):
            if index == run.inject_nan_at:
                state = poisoned(state)
            batch = next(batches)
            tick = time.perf_counter()
            state, out = train_step(state, batch)
            out = {name: float(host_value(value)) for name, value in out.items()}
            seconds, done = time.perf_counter() - tick, index + 1
            if not all(map(math.isfinite, out.values())):
                metrics.write({"step": done, "error": f"non-finite {out}"})
                checkpoint.finish_saves(manager)
                raise non_finite(done, out, manager.latest_step(), folder)
            if index > start:
                speed.add(run.tokens_per_step, seconds)
            record = step_record(done, out, float(schedule(index)), run.tokens_per_step, seconds, flops_per_token, peak)
            if done % run.eval_every == 0 or done == run.steps:
                record.update(evaluate(state.params))
                learned, matrix = last_weights = weights_of(state.params)
                record.update({name: value.tolist() for name, value in learned.items()})
                if cfg.scheme.observes_weights(cfg):
                    record["observed_depth_weights"] = matrix.tolist()
                log_depth_matrix(board, cfg, matrix, done)
            metrics.write(record)
            board.scalars(record)
            stopping = stop.stop_after(done) and done < run.steps  # every process asks, every step
            if done % run.checkpoint_every == 0 or done == run.steps or stopping:
                checkpoint.save(manager, state, checkpoint_meta(run, done))
            if stopping:
                checkpoint.finish_saves(manager)
                raise faults.Preempted(f"stopped by {stop.describe()} after step {done}: checkpoint {done} saved "
                                       f"in {folder / 'checkpoints'}; rerun the same command to resume from it")
            bar.set_postfix(loss=f"{out['loss']:.3f}", val=last_value(metrics.records, "val_loss"),
                            tok_s=f"{speed.tokens_per_s:,.0f}" if speed.tokens_per_s else "compiling", refresh=False)
            bar.update(1)
        checkpoint.finish_saves(manager)
    except (NonFiniteLoss, faults.Preempted, checkpoint.SaveFailed):
        raise
    except Exception as error:  # with several processes: a lost peer, if the runtime says so
        lost = jax.process_count() > 1 and faults.peer_lost(error, run.heartbeat_timeout, index + 1,
                                                            manager.latest_step())
        if lost:
            raise lost from error
        raise
    finally:
        restore_signals()
        bar.close()
        metrics.close()
        board.close()
        manager.close()

    if writer:
        plots.plot_loss_curve(metrics.records, folder / "loss_curve.png", f"{cfg.residual_method}: {folder.name}")
    learned, matrix = last_weights or weights_of(state.params)
    return RunResult(
        output_dir=folder, step=int(host_value(state.step)),
        final_train_loss=last_value(metrics.records, "train_loss"),
        final_val_loss=last_value(metrics.records, "val_loss"),
        final_val_bpb=last_value(metrics.records, "val_bpb"),
        tokens_per_s=speed.tokens_per_s,
        flops_per_token=flops_per_token,
        num_params=num_params,
        mfu=speed.tokens_per_s * flops_per_token / peak if speed.tokens_per_s and peak else None,
        wall_s=time.perf_counter() - started,
        records=metrics.records,
        method_params=learned,
        depth_weights=matrix,
    )


def summary(result: RunResult) -> str:
    """A few lines: where the run ended, its losses, its speed and where its files are."""
    def number(value, fmt):
        return "n/a" if value is None else format(value, fmt)

    folder = result.output_dir.absolute()
    return "\n".join([
        f"done: step {result.step} in {result.wall_s:.1f} s",
        f"  final train loss {number(result.final_train_loss, '.4f')}, "
        f"validation loss {number(result.final_val_loss, '.4f')} (nats/token), "
        f"{number(result.final_val_bpb, '.4f')} bits/byte",
        f"  throughput {number(result.tokens_per_s, ',.0f')} tokens/s x {result.flops_per_token:.3g} FLOPs/token = "
        f"{number(result.tokens_per_s and result.tokens_per_s * result.flops_per_token / 1e12, '.4f')} TFLOP/s, "
        f"MFU {number(result.mfu, '.2%') if result.mfu else 'n/a (peak unknown: --peak-tflops)'}",
        f"  files in {folder}: config.json, metrics.jsonl, loss_curve.png, checkpoints/, "
        f"{'tokenizer.json, ' if (folder / tokenizer.TOKENIZER_FILE).exists() else ''}"
        f"{'data/, ' if (folder / run_corpus.DATA_FOLDER).exists() else ''}TensorBoard events "
        f"(tensorboard --logdir {folder})",
    ])
