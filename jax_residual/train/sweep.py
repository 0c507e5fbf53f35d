"""Sweeps: several methods x several seeds, the same data order for every run.

Run r of method m trains in <sweep>/<m>/seed<seed> with init seed --seed + r and the data seed
fixed (--data-seed, default --seed), so methods and seeds differ only in what they should.
Each run resumes like a single run. Written into the sweep folder:
  sweep.md / sweep.json          final validation loss per method: mean +- sample std over seeds,
                                 Welch's t-test p-value against `standard` (>= 2 seeds each)
  val_curves.png                 a panel per method, a validation-loss curve per seed
  learned_weights.json / .png    methods with learnable weights: the raw parameters and the
                                 per-(layer l, earlier layer i) weights they define, as heatmaps
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from jax_residual.residual import get_method, rerun_layers, standard_scales
from jax_residual.train import loop, plots, stats
from jax_residual.train.metrics import last_value
from jax_residual.train.run_config import RunConfig, digest, identity


@dataclasses.dataclass
class SweepResult:
    folder: pathlib.Path
    rows: list[dict]  # one per method (see method_rows)
    files: list[pathlib.Path]


def sweep_dir(run: RunConfig, methods: tuple[str, ...], seeds: int) -> pathlib.Path:
    """--output-dir, else runs/sweep-<preset>-<digest of the settings, methods and seeds>."""
    if run.output_dir:
        return pathlib.Path(run.output_dir)
    return pathlib.Path("runs") / f"sweep-{run.preset}-{digest({**identity(run), 'method': methods, 'seeds': seeds})}"


def sweep_runs(run: RunConfig, methods: tuple[str, ...], seeds: int) -> list[RunConfig]:
    """Every (method, seed) run of the sweep, in order."""
    folder = sweep_dir(run, methods, seeds)
    return [run.replace(method=method, seed=run.seed + r, data_seed=run.batch_seed,
                        output_dir=str(folder / method / f"seed{run.seed + r}"))
            for method in methods for r in range(seeds)]


def plan_sweep(run: RunConfig, methods: tuple[str, ...], seeds: int) -> list[loop.Plan]:
    """Plans of every run: all of them are checked before the first one compiles."""
    return [loop.plan(r) for r in sweep_runs(run, methods, seeds)]


# ----------------------------------------------------------------------------- learned weights


def layer_weights(method_name: str, params: dict[str, np.ndarray], head_dim: int) -> np.ndarray:
    """[L, L]: row l holds the weights layer l gives earlier layers i under the method's rules.

    Residual methods (3.2, 4.2): w_{l,i} of sum_{i<l} w_{l,i} A~_i / M~_i (zero for i >= l).
    Score methods (5.4, 5.5): the weight of S_i = Q_i K_i^T in layer l's scores relative to
    standard attention, sigma_{l,i} * sqrt(hd) (1 on the diagonal of a standard layer).
    Layer 0 is always the standard layer, as in the model.
    """
    method = get_method(method_name)
    num_layers = next(iter(params.values())).shape[0]
    rows = []
    for layer in range(num_layers):
        p = {name: jnp.asarray(value[layer]) for name, value in params.items()}
        index = jnp.asarray(layer)
        if method.earlier_weights is not None:
            rows.append(method.earlier_weights(index, rerun_layers(index, num_layers), p))
        else:
            scales = standard_scales if layer == 0 else method.score_scales
            rows.append(scales(index, p, num_layers, head_dim) * head_dim**0.5)
    return np.asarray(jnp.stack(rows), np.float64)


def learned_weights(results: dict[str, dict[int, loop.RunResult]], head_dim: int) -> dict:
    """method -> seed -> (raw learned params {name: array}, layer_weights [L, L]), for the
    methods that have learnable weights."""
    return {method: {seed: (r.method_params, layer_weights(method, r.method_params, head_dim))
                     for seed, r in by_seed.items()}
            for method, by_seed in results.items() if any(r.method_params for r in by_seed.values())}


def write_learned_weights(learned: dict, folder: pathlib.Path) -> list[pathlib.Path]:
    """learned_weights.json (raw params and weights per seed, seed mean) and a heatmap per
    method of the seed-mean weights."""
    means = {method: np.mean([w for _, w in by_seed.values()], axis=0) for method, by_seed in learned.items()}
    content = {method: {"per_seed": {str(seed): {"params": {k: v.tolist() for k, v in raw.items()},
                                                 "weights": w.tolist()}
                                     for seed, (raw, w) in by_seed.items()},
                        "mean_weights": means[method].tolist()}
               for method, by_seed in learned.items()}
    (folder / "learned_weights.json").write_text(json.dumps(content, indent=1))
    plots.plot_weight_heatmaps(means, folder / "learned_weights.png")
    return [folder / "learned_weights.json", folder / "learned_weights.png"]


# ----------------------------------------------------------------------------- tables


def method_rows(curves: dict[str, dict[int, list[dict]]]) -> list[dict]:
    """Per method (curves: method -> seed -> metrics records): the final validation loss of each
    seed (seeds ascending), their mean, sample std (None for one seed) and the two-sided p-value
    of Welch's t-test against `standard` (None unless both have >= 2 seeds; None for standard)."""
    finals = {method: [last_value(by_seed[seed], "val_loss") for seed in sorted(by_seed)]
              for method, by_seed in curves.items()}
    baseline = finals.get("standard", [])
    return [{"method": method, "seeds": sorted(curves[method]), "final_val_loss": losses,
             "mean": stats.mean(losses),
             "std": stats.sample_std(losses) if len(losses) > 1 else None,
             "p_vs_standard": (stats.welch_p_value(losses, baseline)
                               if method != "standard" and min(len(losses), len(baseline)) > 1 else None)}
            for method, losses in finals.items()]


def cell(value, fmt: str) -> str:
    """A table cell: the number formatted, or a dash for None (not defined for this row)."""
    return "—" if value is None else format(value, fmt)


def markdown_table(rows: list[dict]) -> str:
    """The rows as a markdown table; a Welch p-value column when any row has one."""
    with_p = any(r["p_vs_standard"] is not None for r in rows)
    columns = ["method", "seeds", "final validation loss (mean ± std)", "per seed"] + ["p vs standard (Welch)"] * with_p
    lines = ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    for r in rows:
        cells = [r["method"], str(len(r["seeds"])), f"{r['mean']:.4f} ± {cell(r['std'], '.4f')}",
                 ", ".join(f"{v:.4f}" for v in r["final_val_loss"])] + [cell(r["p_vs_standard"], ".3g")] * with_p
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- the sweep


def run_sweep(plans: list[loop.Plan], folder: pathlib.Path, log=print) -> SweepResult:
    """Train every planned run (each resumes if it can), then write the sweep's files (process
    0 only)."""
    writer = jax.process_index() == 0
    results: dict[str, dict[int, loop.RunResult]] = {}
    for index, p in enumerate(plans):
        if writer:
            log(f"\n=== sweep run {index + 1}/{len(plans)}: {p.run.method}, seed {p.run.seed} ===")
        results.setdefault(p.run.method, {})[p.run.seed] = loop.train(p, log=log)

    curves = {m: {s: r.records for s, r in by_seed.items()} for m, by_seed in results.items()}
    rows = method_rows(curves)
    if not writer:
        return SweepResult(folder, rows, [])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sweep.md").write_text(markdown_table(rows))
    (folder / "sweep.json").write_text(json.dumps({"rows": rows}, indent=2))
    plots.plot_sweep_curves(curves, folder / "val_curves.png")
    files = [folder / "sweep.md", folder / "sweep.json", folder / "val_curves.png"]

    learned = learned_weights(results, plans[0].cfg.head_dim)
    if learned:
        files += write_learned_weights(learned, folder)
    return SweepResult(folder, rows, files)


def summary(result: SweepResult) -> str:
    return (f"\nsweep: final validation loss per method\n{markdown_table(result.rows)}"
            f"files: {', '.join(str(f.absolute()) for f in result.files)}")
