"""Sweeps: several methods x several seeds, the same data order for every run.

An entry of the sweep is a method, or a method with its own scheme knobs, `METHOD:KNOB=VALUE`
(`hyper_connections:hc_dynamic=true`, `denseformer:dense_period=2`; several joined by ':'), so
variants of one scheme compare in one sweep. Run r of entry e trains in <sweep>/<e>/seed<seed>
with init seed --seed + r and the data seed fixed (--data-seed, default --seed), so entries and
seeds differ only in what they should.
Each run trains for the steps the sweep's budget gives its method (budget.py: equal steps, or
equal training FLOPs). Each run resumes like a single run, so an interrupted sweep rerun with
the same command restores its finished runs from their last checkpoints (no step retrained),
finishes the others, and tabulates them all. Written into the sweep folder:
  sweep.md / sweep.json          per method: parameters, FLOPs/token relative to standard,
                                 measured tokens/s, steps, final validation loss mean +- sample
                                 std over seeds, Welch's t-test p-value against `standard` (>= 2
                                 seeds each; jax_residual/train/stats.py)
  val_curves.png                 validation loss against training FLOPs, a line per run
  learned_weights.json / .png    methods with learnable weights: the raw parameters, and as
                                 heatmaps the per-layer weights they define where they form a
                                 (layer, earlier layer / block) matrix (input-dependent ones:
                                 their mean over the validation tokens; loop.depth_matrix)
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import numpy as np

from jax_residual.connections import get_method, method_names
from jax_residual.train import flops, loop, plots, stats
from jax_residual.train.budget import Budget
from jax_residual.train.metrics import last_value
from jax_residual.train.run_config import RunConfig, digest, identity


@dataclasses.dataclass
class SweepResult:
    folder: pathlib.Path
    rows: list[dict]  # one per method (see method_rows)
    files: list[pathlib.Path]


def sweep_dir(run: RunConfig, entries: tuple[str, ...], seeds: int) -> pathlib.Path:
    """--output-dir, else runs/sweep-<preset>-<digest of the settings, entries and seeds>."""
    if run.output_dir:
        return pathlib.Path(run.output_dir)
    return pathlib.Path("runs") / f"sweep-{run.preset}-{digest({**identity(run), 'method': entries, 'seeds': seeds})}"


def budget_steps(run: RunConfig, budget: Budget) -> int:
    """The steps `budget` gives `run`'s method (its own --steps if its model cannot be built:
    planning then reports why)."""
    if budget.kind == "steps":
        return int(budget.amount)
    try:
        cfg, _ = loop.resolve_model(run)
    except ValueError:
        return run.steps
    return budget.steps(flops.flops_per_token(cfg, run.seq_len), run.tokens_per_step)


def parse_entry(entry: str) -> tuple[str, dict]:
    """'hyper_connections:hc_dynamic=true' -> ('hyper_connections', {'hc_dynamic': True}): the
    method and the scheme knobs the entry sets (each one the method reads, typed like its default)."""
    method, *settings = entry.split(":")
    if method not in method_names():
        raise ValueError(f"unknown method {method!r} in sweep entry {entry!r}; allowed: {', '.join(method_names())}")
    fields = {f.name: f for f in dataclasses.fields(get_method(method).knobs)}
    knobs = {}
    for setting in settings:
        name, _, text = setting.partition("=")
        if name not in fields or not text:
            raise ValueError(f"bad setting {setting!r} in sweep entry {entry!r}: expected KNOB=VALUE with KNOB one "
                             f"of {method}'s knobs {list(fields)}")
        knobs[name] = knob_value(fields[name], text)
    return method, knobs


def knob_value(field: dataclasses.Field, text: str):
    """A knob's value from its text, typed like its default (bool: true/false/1/0)."""
    name = field.name
    if isinstance(field.default, str):
        return text
    if isinstance(field.default, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"bad value {text!r} for {name}: expected true or false")
        return text.lower() in ("true", "1")
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"bad value {text!r} for {name}: expected an integer") from None


def sweep_runs(run: RunConfig, entries: tuple[str, ...], seeds: int, budget: Budget | None = None) -> list[RunConfig]:
    """Every (entry, seed) run of the sweep, in order. budget: default steps=run.steps."""
    budget = budget or Budget("steps", run.steps)
    if budget.kind == "flops" and run.decay_steps is not None:
        raise ValueError("--decay-steps cannot be combined with --budget flops=F: each run's schedule follows the "
                         "steps its FLOPs buy")
    folder = sweep_dir(run, entries, seeds)
    by_entry = {}
    for entry in entries:
        method, knobs = parse_entry(entry)
        by_entry[entry] = own_knobs(run.replace(method=method)).with_knobs(**knobs)
    steps = {entry: budget_steps(r, budget) for entry, r in by_entry.items()}
    return [by_entry[entry].replace(steps=steps[entry], seed=run.seed + r, data_seed=run.batch_seed,
                                    output_dir=str(folder / entry / f"seed{run.seed + r}"))
            for entry in entries for r in range(seeds)]


def own_knobs(run: RunConfig) -> RunConfig:
    """The run without the scheme knobs its method does not read (a sweep's --hc-dynamic applies
    to hyper_connections, not to the other methods it compares)."""
    names = {f.name for f in dataclasses.fields(get_method(run.method).knobs)} if run.method in method_names() else ()
    return run.replace(knobs=tuple((name, value) for name, value in run.knobs if name in names))


def entry_of(run: RunConfig) -> str:
    """The sweep entry of a run made by sweep_runs (its folder is <sweep>/<entry>/seed<seed>)."""
    return pathlib.Path(run.output_dir).parent.name


def plan_sweep(run: RunConfig, entries: tuple[str, ...], seeds: int, budget: Budget | None = None,
               devices=None) -> list[loop.Plan]:
    """Plans of every run on `devices` (None: all): all of them are checked before the first one
    compiles."""
    return [loop.plan(r, devices) for r in sweep_runs(run, entries, seeds, budget)]


# ----------------------------------------------------------------------------- learned weights


def learned_weights(results: dict[str, dict[int, loop.RunResult]]) -> dict:
    """entry -> seed -> (raw learned params {name: array}, the run's depth matrix or None
    (`loop.depth_matrix`: the learned matrix, or the mean observed weights where they depend on
    the tokens)), for the entries whose method has learnable weights."""
    return {entry: {seed: (r.method_params, r.depth_weights) for seed, r in by_seed.items()}
            for entry, by_seed in results.items() if any(r.method_params for r in by_seed.values())}


def write_learned_weights(learned: dict, folder: pathlib.Path) -> list[pathlib.Path]:
    """learned_weights.json (raw params and weights per seed, seed mean) and a heatmap per
    method of the seed-mean weights (methods whose weights form a matrix)."""
    means = {method: None if any(w is None for _, w in by_seed.values())
             else np.mean([w for _, w in by_seed.values()], axis=0) for method, by_seed in learned.items()}
    as_list = lambda w: None if w is None else w.tolist()
    content = {method: {"per_seed": {str(seed): {"params": {k: v.tolist() for k, v in raw.items()},
                                                 "weights": as_list(w)}
                                     for seed, (raw, w) in by_seed.items()},
                        "mean_weights": as_list(means[method])}
               for method, by_seed in learned.items()}
    (folder / "learned_weights.json").write_text(json.dumps(content, indent=1))
    files = [folder / "learned_weights.json"]
    matrices = {method: w for method, w in means.items() if w is not None}
    if matrices:
        plots.plot_weight_heatmaps(matrices, folder / "learned_weights.png")
        files.append(folder / "learned_weights.png")
    return files


# ----------------------------------------------------------------------------- statistics


# ----------------------------------------------------------------------------- tables

REFERENCE = "standard"


def method_rows(curves: dict[str, dict[int, list[dict]]], facts: dict[str, dict] | None = None) -> list[dict]:
    """Per method (curves: method -> seed -> metrics records): the final validation loss of each
    seed (seeds ascending), their mean, sample std (None for one seed) and the two-sided p-value
    of Welch's t-test against `standard` (None unless both have >= 2 seeds; None for standard),
    plus the method's `facts` (`run_facts`: parameters, FLOPs/token, tokens/s, steps) if given."""
    finals = {method: [last_value(by_seed[seed], "val_loss") for seed in sorted(by_seed)]
              for method, by_seed in curves.items()}
    baseline = finals.get(REFERENCE, [])
    return [{"method": method, "seeds": sorted(curves[method]), **(facts or {}).get(method, {}),
             "final_val_loss": losses,
             "mean": stats.mean(losses),
             "std": stats.sample_std(losses) if len(losses) > 1 else None,
             "p_vs_standard": (stats.welch_p_value(losses, baseline)
                               if method != REFERENCE and min(len(losses), len(baseline)) > 1 else None)}
            for method, losses in finals.items()]


def measured_tokens_per_s(result: loop.RunResult) -> float | None:
    """Median tokens/s over the run's step records (robust to each invocation's compiling step;
    a run restored already finished keeps the throughput it was trained at)."""
    speeds = [r["tokens_per_s"] for r in result.records if "tokens_per_s" in r]
    return float(np.median(speeds)) if speeds else None


def standard_flops_per_token(cfg, seq_len: int) -> float:
    """FLOPs/token of the standard model of the same sizes (the reference of the FLOP ratio)."""
    standard = dataclasses.replace(cfg, residual_method=REFERENCE, knobs=None, recompute_chunk_size=1)
    return flops.flops_per_token(standard, seq_len)


def run_facts(results: dict[str, dict[int, loop.RunResult]], standard_flops: float) -> dict[str, dict]:
    """Per method: parameters, FLOPs/token and its ratio to standard's, measured tokens/s (mean
    over seeds) and the steps its runs trained."""
    facts = {}
    for method, by_seed in results.items():
        first = by_seed[min(by_seed)]
        speeds = [v for v in map(measured_tokens_per_s, by_seed.values()) if v is not None]
        facts[method] = {"params": first.num_params, "flops_per_token": first.flops_per_token,
                         "flops_ratio": first.flops_per_token / standard_flops,
                         "tokens_per_s": float(np.mean(speeds)) if speeds else None,
                         "steps": sorted({r.step for r in by_seed.values()})}
    return facts


def cell(value, fmt: str) -> str:
    """A table cell: the number formatted, or a dash for None (not defined for this row)."""
    return "—" if value is None else format(value, fmt)


def markdown_table(rows: list[dict]) -> str:
    """The rows as a markdown table: the run facts when the rows have them, a Welch p-value
    column when any row has one."""
    with_facts = all("flops_ratio" in r for r in rows)
    with_p = any(r["p_vs_standard"] is not None for r in rows)
    columns = (["method", "seeds"] + ["params", "FLOPs/token (x standard)", "tokens/s", "steps"] * with_facts
               + ["final validation loss (mean ± std)", "per seed"] + ["p vs standard (Welch)"] * with_p)
    lines = ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    for r in rows:
        facts = [f"{r['params']:,}", f"{r['flops_per_token']:.4g} ({r['flops_ratio']:.3f})",
                 cell(r["tokens_per_s"], ",.0f"), ", ".join(map(str, r["steps"]))] if with_facts else []
        cells = ([r["method"], str(len(r["seeds"]))] + facts + [f"{r['mean']:.4f} ± {cell(r['std'], '.4f')}",
                 ", ".join(f"{v:.4f}" for v in r["final_val_loss"])] + [cell(r["p_vs_standard"], ".3g")] * with_p)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- the sweep


def run_sweep(plans: list[loop.Plan], folder: pathlib.Path, log=print) -> SweepResult:
    """Train every planned run (each resumes if it can: a finished one is restored, not
    retrained), then write the sweep's files (process 0 only)."""
    writer = jax.process_index() == 0
    results: dict[str, dict[int, loop.RunResult]] = {}
    for index, p in enumerate(plans):
        if writer:
            log(f"\n=== sweep run {index + 1}/{len(plans)}: {entry_of(p.run)}, seed {p.run.seed}, {p.run.steps} steps ===")
        results.setdefault(entry_of(p.run), {})[p.run.seed] = loop.train(p, log=log)

    first = plans[0]
    curves = {m: {s: r.records for s, r in by_seed.items()} for m, by_seed in results.items()}
    rows = method_rows(curves, run_facts(results, standard_flops_per_token(first.cfg, first.run.seq_len)))
    if not writer:
        return SweepResult(folder, rows, [])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sweep.md").write_text(markdown_table(rows))
    (folder / "sweep.json").write_text(json.dumps({"rows": rows}, indent=2))
    flops_per_step = {m: next(iter(by_seed.values())).flops_per_token * first.run.tokens_per_step
                      for m, by_seed in results.items()}
    plots.plot_sweep_curves(curves, flops_per_step, folder / "val_curves.png")
    files = [folder / "sweep.md", folder / "sweep.json", folder / "val_curves.png"]

    learned = learned_weights(results)
    if learned:
        files += write_learned_weights(learned, folder)
    return SweepResult(folder, rows, files)


def summary(result: SweepResult) -> str:
    return (f"\nsweep: per method\n{markdown_table(result.rows)}"
            f"files: {', '.join(str(f.absolute()) for f in result.files)}")
