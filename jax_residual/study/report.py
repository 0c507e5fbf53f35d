"""The study's report, from its result files only (docs/study.md): per size and scheme the
chosen learning rate (flagged at the edge of the grid), the FLOP-matched test loss, the compute
multiplier against `standard`'s curve with its 95% bootstrap interval, the step-matched gap
with its interval, and the measured tokens/s and seconds per step. Learning rates are chosen on
validation (plan.choose_lr); everything reported here is read from the test split.

Written into <output_dir>/report/: report.md, report.json, loss_vs_flops.png (test loss against
training FLOPs per size, with standard's fitted curve), multipliers.png, lr_sensitivity.png
(validation loss against the learning rate at the tuned and checked sizes) and, per size,
learned_<size>/ (the learned connection weights, as the sweep writes them).
"""

from __future__ import annotations

import json
import math
import pathlib
import textwrap
import types

import numpy as np

from jax_residual.study import multipliers as mult
from jax_residual.study import plan as plans
from jax_residual.study.spec import REFERENCE, Study
from jax_residual.train import plots, sweep

TEST = "test"


def test_losses(results: list[dict]) -> np.ndarray:
    """The test losses of runs over seeds [n] (+inf for a diverged run)."""
    return np.asarray([math.inf if r.get("diverged") else r[TEST]["loss"] for r in results], np.float64)


def training_flops(result: dict) -> float:
    return result["flops_per_token"] * result["tokens_per_step"] * result["steps"]


def runs_by(study: Study, slots, chosen, results, entry: str, size: str, budget: str) -> list[dict]:
    """The results over seeds (ascending) of `entry` at `size` under `budget`, at its chosen rate."""
    found = [(s.seed, results[plans.slot_key(study, s, chosen[entry, size])]) for s in slots
             if s.stage == "report" and (s.entry, s.size) == (entry, size) and budget in s.budgets]
    return [r | {"tokens_per_step": study.train.tokens_per_step} for _, r in sorted(found, key=lambda x: x[0])]


def standard_points(study: Study, slots, chosen, results) -> tuple[list[float], np.ndarray]:
    """standard's curve: training FLOPs [K] of its report runs (every size and compute multiple)
    and their test losses [K, seeds]."""
    by_cost: dict[float, dict[int, float]] = {}
    for s in slots:
        if s.stage == "report" and s.entry == REFERENCE:
            r = results[plans.slot_key(study, s, chosen[s.entry, s.size])] | {"tokens_per_step": study.train.tokens_per_step}
            by_cost.setdefault(training_flops(r), {})[s.seed] = test_losses([r])[0]
    costs = sorted(by_cost)
    losses = np.asarray([[by_cost[c][seed] for seed in sorted(by_cost[c])] for c in costs])
    if not np.all(np.isfinite(losses)):
        raise ValueError(f"standard diverged at its chosen learning rate in some run: losses {losses.tolist()}")
    return costs, losses


def mean_std(values: np.ndarray) -> tuple[float, float | None]:
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else None


def speed(results: list[dict]) -> tuple[float | None, float | None]:
    """Mean measured tokens/s over the runs, and the seconds per step it gives."""
    speeds = [r["tokens_per_s"] for r in results if r.get("tokens_per_s")]
    if not speeds:
        return None, None
    tokens_per_s = float(np.mean(speeds))
    return tokens_per_s, results[0]["tokens_per_step"] / tokens_per_s


def size_rows(study: Study, slots, chosen, results, curves: mult.StandardCurves, size: str,
              rng: np.random.Generator) -> list[dict]:
    """One row per scheme at `size` (see the module docstring)."""
    flop_budget = "flops" if "flops" in study.budgets else study.budgets[0]
    standard_steps = runs_by(study, slots, chosen, results, REFERENCE, size, "steps") if "steps" in study.budgets else []
    standard_speed = speed(runs_by(study, slots, chosen, results, REFERENCE, size, flop_budget))[1]
    rows = []
    for entry in study.schemes:
        matched = runs_by(study, slots, chosen, results, entry, size, flop_budget)
        losses = test_losses(matched)
        multiplier = mult.bootstrap_multiplier(curves, losses, float(np.mean([training_flops(r) for r in matched])), rng)
        gap = None
        if standard_steps:
            same_steps = test_losses(runs_by(study, slots, chosen, results, entry, size, "steps"))
            gap = mult.bootstrap_gap(same_steps, test_losses(standard_steps), study.bootstrap, rng)
        tokens_per_s, step_s = speed(matched)
        lr = chosen[entry, size]
        rows.append({"scheme": entry, "size": size, "lr": lr, "lr_tuned_here": size in study.lr.tune_sizes,
                     "training_flops": float(np.mean([training_flops(r) for r in matched])),
                     "lr_at_edge": plans.at_edge(lr, study.lr.grid), "seeds": len(matched),
                     "steps": sorted({r["steps"] for r in matched}),
                     "test_loss": mean_std(losses), "multiplier": None if multiplier is None else vars(multiplier),
                     "step_matched_gap": None if gap is None else vars(gap),
                     "tokens_per_s": tokens_per_s, "seconds_per_step": step_s,
                     "step_time_ratio": step_s / standard_speed if step_s and standard_speed else None})
    return rows


def sensitivity(study: Study, slots, results) -> dict[str, dict[str, dict[float, float]]]:
    """size -> scheme -> rate -> mean validation loss of the grid runs (the choice's inputs)."""
    out: dict = {}
    for size in study.lr.tune_sizes + study.lr.check_sizes:
        for entry in study.schemes:
            grid = plans.grid_losses(study, slots, results, entry, size)
            out.setdefault(size, {})[entry] = {lr: float(np.mean(v)) for lr, v in grid.items()}
    return out


def transfer_checks(study: Study, slots, results, chosen) -> list[dict]:
    """At each check size: the rate its own grid would choose beside the transferred one."""
    return [{"size": size, "scheme": entry, "transferred": chosen[entry, size],
             "grid_choice": plans.choose_lr(plans.grid_losses(study, slots, results, entry, size))}
            for size in study.lr.check_sizes for entry in study.schemes]


# ----------------------------------------------------------------------------- markdown


def interval(estimate: dict | None, fmt: str) -> str:
    if estimate is None:
        return "—"
    return f"{estimate['value']:{fmt}} [{estimate['low']:{fmt}}, {estimate['high']:{fmt}}]"


def lr_cell(row: dict) -> str:
    return f"{row['lr']:.3g}" + (" (edge)" if row["lr_at_edge"] else "")


def summary(report: dict) -> list[str]:
    """One row per scheme over every size (the README's table): its learning rate(s), the
    compute multiplier [95%] and the step-matched gap [95%] at each size, and tokens/s per size."""
    sizes = list(report["sizes"])
    by_scheme: dict[str, list[dict]] = {}
    for rows in report["sizes"].values():
        for r in rows:
            by_scheme.setdefault(r["scheme"], []).append(r)
    header = ["scheme", "lr", *(f"multiplier {s} [95%]" for s in sizes), *(f"step-matched gap {s} [95%]" for s in sizes),
              "tokens/s " + " / ".join(sizes)]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for scheme, rows in by_scheme.items():
        cells = [scheme, " / ".join(dict.fromkeys(lr_cell(r) for r in rows)),
                 *(interval(r["multiplier"], ".3g") for r in rows), *(interval(r["step_matched_gap"], "+.3f") for r in rows),
                 " / ".join(sweep.cell(r["tokens_per_s"], ",.0f") for r in rows)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(report: dict) -> str:
    """The report as markdown: the curve, the summary, one table per size, the lr tables."""
    lines = [f"# Study {report['name']}", "",
             f"standard's curve: {report['fit']['reason']}" + (
                 f": L(C) = {report['fit']['E']:.4f} + {report['fit']['A']:.4f} (C / {report['fit']['c0']:.3g})"
                 f"^-{report['fit']['alpha']:.4f}" if report['fit']['kind'] == "power law" else ""), "",
             "## Summary", "", *summary(report), ""]
    for size, rows in report["sizes"].items():
        lines += [f"## {size}", "",
                  "| scheme | lr | test loss (FLOP-matched, mean ± std) | compute multiplier [95%] | "
                  "step-matched gap [95%] | tokens/s | s/step (x standard) |", "|---" * 7 + "|"]
        for r in rows:
            mean, std = r["test_loss"]
            lr = lr_cell(r) + ("" if r["lr_tuned_here"] else " (transferred)")
            step = "—" if r["seconds_per_step"] is None else (
                f"{r['seconds_per_step']:.3g} ({sweep.cell(r['step_time_ratio'], '.2f')})")
            lines.append(f"| {r['scheme']} | {lr} | {mean:.4f} ± {sweep.cell(std, '.4f')} (n={r['seeds']}) | "
                         f"{interval(r['multiplier'], '.3g')} | {interval(r['step_matched_gap'], '+.4f')} | "
                         f"{sweep.cell(r['tokens_per_s'], ',.0f')} | {step} |")
        lines.append("")
    for size, by_scheme in report["sensitivity"].items():
        grid = sorted({lr for values in by_scheme.values() for lr in values})
        lines += [f"## Validation loss by learning rate, {size} (the choice's inputs)", "",
                  "| scheme | " + " | ".join(f"{lr:.3g}" for lr in grid) + " |", "|---" * (len(grid) + 1) + "|"]
        for entry, values in by_scheme.items():
            lines.append(f"| {entry} | " + " | ".join(sweep.cell(values.get(lr), ".4f") for lr in grid) + " |")
        lines.append("")
    if report["transfer_checks"]:
        lines += ["## Learning-rate transfer check", "", "| size | scheme | transferred | own grid's choice |",
                  "|---|---|---|---|"]
        lines += [f"| {c['size']} | {c['scheme']} | {c['transferred']:.3g} | {c['grid_choice']:.3g} |"
                  for c in report["transfer_checks"]]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- figures


def plot_loss_vs_flops(report: dict, costs, losses, curve, path: pathlib.Path):
    figure, axes = plots.panel_grid(len(report["sizes"]))
    grid = np.geomspace(min(costs) / 1.5, max(costs) * 1.5, 200)
    for axis, (size, rows) in zip(axes, report["sizes"].items()):
        if curve is not None:
            axis.plot(grid, curve.loss(grid), color="k", lw=1, label=f"standard: {curve.kind}")
        axis.scatter(costs, losses.mean(-1), color="k", s=12, zorder=3)
        for r in rows:
            mean, std = r["test_loss"]
            axis.errorbar([r["training_flops"]], [mean], yerr=[std or 0.0], fmt="o", ms=4, label=r["scheme"])
        axis.set(xscale="log", xlabel="training FLOPs", ylabel="test loss", title=size)
    axes[0].legend(fontsize=6)
    plots.save(figure, path)


def plot_multipliers(report: dict, path: pathlib.Path):
    figure, axes = plots.panel_grid(len(report["sizes"]), width=6)
    for axis, (size, rows) in zip(axes, report["sizes"].items()):
        finite = [r for r in rows if r["multiplier"] and all(np.isfinite(v) and v > 0 for v in r["multiplier"].values())]
        values = np.asarray([r["multiplier"]["value"] for r in finite])
        errors = np.asarray([[r["multiplier"]["value"] - r["multiplier"]["low"],
                              r["multiplier"]["high"] - r["multiplier"]["value"]] for r in finite]).reshape(-1, 2).T
        axis.errorbar(range(len(finite)), values, yerr=errors, fmt="o")
        axis.axhline(1.0, color="k", lw=0.8)
        if not finite:
            why = report["fit"]["reason"] if report["fit"]["kind"] is None else "no finite multiplier"
            axis.text(0.5, 0.5, textwrap.fill(why, 40), ha="center", va="center", fontsize=7, transform=axis.transAxes)
        axis.set(yscale="log", title=f"{size}: compute multiplier (95%)", xticks=range(len(finite)))
        axis.set_xticklabels([r["scheme"] for r in finite], rotation=70, fontsize=6)
    plots.save(figure, path)


def plot_sensitivity(report: dict, path: pathlib.Path):
    figure, axes = plots.panel_grid(len(report["sensitivity"]))
    for axis, (size, by_scheme) in zip(axes, report["sensitivity"].items()):
        for entry, values in by_scheme.items():
            lrs = sorted(values)
            axis.plot(lrs, [min(values[lr], 1e3) for lr in lrs], "o-", ms=3, label=entry)
        axis.set(xscale="log", xlabel="learning rate", ylabel="validation loss", title=size)
    axes[0].legend(fontsize=6)
    plots.save(figure, path)


def write_learned(study: Study, slots, chosen, results, folder: pathlib.Path) -> list[pathlib.Path]:
    """Per size, the sweep's learned-weight files of the FLOP-matched runs (schemes that learn)."""
    files = []
    budget = study.budgets[0]
    for size in study.sizes:
        by_entry = {}
        for entry in study.schemes:
            runs = runs_by(study, slots, chosen, results, entry, size.name, budget)
            if any(r.get("method_params") for r in runs):
                by_entry[entry] = {r["seed"]: types.SimpleNamespace(
                    method_params={k: np.asarray(v) for k, v in r["method_params"].items()},
                    depth_weights=None if r.get("depth_weights") is None else np.asarray(r["depth_weights"]))
                    for r in runs}
        if by_entry:
            target = folder / f"learned_{size.name}"
            target.mkdir(parents=True, exist_ok=True)
            files += sweep.write_learned_weights(sweep.learned_weights(by_entry), target)
    return files


# ----------------------------------------------------------------------------- the report


def build_report(study: Study, slots, chosen, results, seed: int = 0) -> tuple[dict, tuple]:
    """(the report as a dict, (standard's costs, losses [K, seeds], its curve)): pure of the results."""
    rng = np.random.default_rng(seed)
    costs, losses = standard_points(study, slots, chosen, results)
    curves = mult.standard_curves(costs, losses, study.bootstrap, rng)
    fit = curves.fit
    law = fit.curve if isinstance(fit.curve, mult.PowerLaw) else None
    sizes = {}
    for size in study.sizes:
        sizes[size.name] = size_rows(study, slots, chosen, results, curves, size.name, rng)
    report = {"name": study.name, "skipped": list(study.skipped),
              "fit": {"kind": None if fit.curve is None else fit.curve.kind, "reason": fit.reason, "points": len(costs),
                      "max_relative_residual": fit.max_relative_residual,
                      **({"E": law.E, "A": law.A, "alpha": law.alpha, "c0": law.c0} if law else {})},
              "sizes": sizes, "sensitivity": sensitivity(study, slots, results),
              "transfer_checks": transfer_checks(study, slots, results, chosen),
              "chosen": {f"{entry}@{size}": lr for (entry, size), lr in chosen.items()}}
    return report, (costs, losses, fit.curve)


def write_report(study: Study, slots, chosen, results) -> list[pathlib.Path]:
    """report.md, report.json and the figures in <output_dir>/report/."""
    folder = study.output_dir / "report"
    folder.mkdir(parents=True, exist_ok=True)
    report, (costs, losses, curve) = build_report(study, slots, chosen, results)
    (folder / "report.md").write_text(markdown(report))
    (folder / "report.json").write_text(json.dumps(report, indent=1, default=float))
    plot_loss_vs_flops(report, costs, losses, curve, folder / "loss_vs_flops.png")
    plot_multipliers(report, folder / "multipliers.png")
    plot_sensitivity(report, folder / "lr_sensitivity.png")
    files = [folder / name for name in ("report.md", "report.json", "loss_vs_flops.png", "multipliers.png",
                                        "lr_sensitivity.png")]
    return files + write_learned(study, slots, chosen, results, folder)
