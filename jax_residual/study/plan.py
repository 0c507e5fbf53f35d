"""Every run of a study, in a fixed order, and the learning-rate choice (docs/study.md).

A slot is one run of the plan: scheme (a sweep entry) x size x seed x steps, and its learning
rate, either a value of the grid (stage "tune": the grid at the tune and check sizes, on the
first `tune_seeds` seeds, under the first budget) or the one chosen for its scheme and size
(stage "report": every size, every seed, every budget (the step-matched one on the first
`step_matched_seeds` seeds; standard's on all), and `standard` at its extra compute multiples). The steps of a slot follow from its budget (budget.py): "flops" gives the scheme
the steps that standard's FLOPs for the size's `steps` buy; "steps" gives it the size's `steps`.
Slots that are the same run (standard under both budgets) are one slot. Slot j belongs to
worker j mod n. A report slot's run is known once every tune slot has a result; it may then be
a tune run already trained (its chosen lr, a tune seed), which is not trained again.

The choice (`choose_lr`) is a pure function of validation losses: the grid value with the
lowest mean validation loss over the tune seeds (a diverged run counts as +inf; ties go to the
smaller rate). Sizes that are not tuned take the first tune size's choice by the transfer rule:
"constant" (the same rate: the ladder changes depth only), or "inverse_width" (lr x width of
the tune size / width, the muP-style rule for a ladder that widens).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import pathlib

from jax_residual.study.spec import REFERENCE, Study
from jax_residual.train import loop, sweep
from jax_residual.train.budget import Budget
from jax_residual.train.run_config import RunConfig
from jax_residual.train import flops


@dataclasses.dataclass(frozen=True)
class Slot:
    index: int  # position in the plan: worker index mod n runs it
    stage: str  # "tune" | "report"
    entry: str
    size: str
    seed: int
    steps: int
    budgets: tuple[str, ...]  # the budgets (and "fit": a standard compute multiple) this run serves
    lr: float | None  # None: the rate chosen for (entry, size)

    @property
    def key(self) -> tuple:
        return self.entry, self.size, self.seed, self.steps


def base_run(study: Study, entry: str, size: str) -> RunConfig:
    """The shared [train] settings with the entry's method and knobs and the size's model sizes."""
    method, knobs = sweep.parse_entry(entry)
    run = study.train.replace(method=method, tokenizer=study.tokenizer, **dict(study.size(size).overrides))
    return sweep.own_knobs(run).with_knobs(**knobs)


@functools.cache
def flops_per_token(study: Study, entry: str, size: str) -> float:
    """Training FLOPs per token of `entry`'s model at `size` (train/flops.py)."""
    cfg, _ = loop.resolve_model(base_run(study, entry, size))
    return flops.flops_per_token(cfg, study.train.seq_len)


def budget_steps(study: Study, entry: str, size: str, budget: str, multiple: float = 1.0) -> int:
    """The steps of `entry` at `size` under `budget` ("flops" or "steps"), for standard's steps
    at the size times `multiple`."""
    standard_steps = max(1, round(study.size(size).steps * multiple))
    if budget == "steps":
        return standard_steps
    amount = flops_per_token(study, REFERENCE, size) * study.train.tokens_per_step * standard_steps
    return Budget("flops", amount).steps(flops_per_token(study, entry, size), study.train.tokens_per_step)


def plan_slots(study: Study) -> list[Slot]:
    """Every slot of the study in plan order: the tune stage, then the report stage."""
    slots: dict[tuple, Slot] = {}

    def add(stage, entry, size, seed, steps, budget, lr):
        key = (stage, entry, size, seed, steps, lr)
        if key in slots:
            slots[key] = dataclasses.replace(slots[key], budgets=slots[key].budgets + (budget,))
        else:
            slots[key] = Slot(len(slots), stage, entry, size, seed, steps, (budget,), lr)

    tuning = study.budgets[0]
    for size in study.lr.tune_sizes + study.lr.check_sizes:
        for entry in study.schemes:
            steps = budget_steps(study, entry, size, tuning)
            for lr in study.lr.grid:
                for seed in study.seeds[:study.lr.tune_seeds]:
                    add("tune", entry, size, seed, steps, tuning, lr)
    for size in (s.name for s in study.sizes):
        for entry in study.schemes:
            for rank, seed in enumerate(study.seeds):
                for budget in study.budgets:
                    if budget != "steps" or entry == REFERENCE or rank < study.step_matched_seeds:
                        add("report", entry, size, seed, budget_steps(study, entry, size, budget), budget, None)
                for multiple in study.standard_compute_multiples:
                    if entry == REFERENCE and multiple != 1.0:
                        add("report", entry, size, seed, budget_steps(study, entry, size, "steps", multiple), "fit",
                            None)
    return list(slots.values())


def worker_slots(slots: list[Slot], worker: int, workers: int) -> list[Slot]:
    """The slots worker `worker` of `workers` runs: index mod workers == worker."""
    if not 0 <= worker < workers:
        raise ValueError(f"--worker {worker} must be in [0, --workers {workers})")
    return [s for s in slots if s.index % workers == worker]


def run_folder(study: Study, entry: str, size: str, lr: float, steps: int, seed: int) -> pathlib.Path:
    return study.output_dir / "runs" / entry / size / f"lr{lr:g}-steps{steps}-seed{seed}"


def slot_run(study: Study, slot: Slot, lr: float) -> RunConfig:
    """The RunConfig of a slot at learning rate `lr`: its own steps and schedule, init and data
    seed `seed` (every scheme sees seed s's data order), the study's prepared data."""
    run = base_run(study, slot.entry, slot.size)
    warmup = run.warmup_steps if run.warmup_steps < slot.steps else slot.steps // 2
    folder = run_folder(study, slot.entry, slot.size, lr, slot.steps, slot.seed)
    return run.replace(lr=lr, steps=slot.steps, seed=slot.seed, data_seed=slot.seed, warmup_steps=warmup,
                       data=str(data_folder(study)), output_dir=str(folder),
                       eval_every=min(run.eval_every, slot.steps), checkpoint_every=min(run.checkpoint_every, slot.steps))


def data_folder(study: Study) -> pathlib.Path:
    return study.output_dir / "data"


# ----------------------------------------------------------------------------- the choice


def validation_loss(result: dict) -> float:
    """The loss a choice reads: the run's validation-split loss (+inf if it diverged)."""
    return math.inf if result.get("diverged") else float(result["validation"]["loss"])


def choose_lr(validation: dict[float, list[float]]) -> float:
    """The rate with the lowest mean validation loss (validation: rate -> losses over the tune
    seeds, +inf for a diverged run); ties: the smaller rate."""
    if not validation:
        raise ValueError("no learning rate to choose from")
    mean = {lr: sum(losses) / len(losses) for lr, losses in validation.items()}
    return min(sorted(mean), key=lambda lr: mean[lr])


def at_edge(lr: float, grid: tuple[float, ...]) -> bool:
    """True when `lr` is the smallest or largest value of the grid: the optimum may lie outside."""
    return lr in (min(grid), max(grid))


def grid_losses(study: Study, slots: list[Slot], results: dict, entry: str, size: str) -> dict[float, list[float]]:
    """rate -> validation losses over the tune seeds of (entry, size): only what the choice reads."""
    found: dict[float, list[float]] = {}
    for s in slots:
        if s.stage == "tune" and (s.entry, s.size) == (entry, size):
            found.setdefault(s.lr, []).append(validation_loss(results[slot_key(study, s, s.lr)]))
    return found


def slot_key(study: Study, slot: Slot, lr: float) -> str:
    """The results key of a slot at rate lr: its run folder."""
    return str(run_folder(study, slot.entry, slot.size, lr, slot.steps, slot.seed))


@functools.cache
def width(study: Study, size: str) -> int:
    cfg, _ = loop.resolve_model(base_run(study, REFERENCE, size))
    return cfg.hidden_size


def chosen_lrs(study: Study, slots: list[Slot], results: dict) -> dict[tuple[str, str], float]:
    """(entry, size) -> its learning rate: chosen on its own grid at a tune size, else the first
    tune size's choice transferred (module docstring). results: run folder -> result, holding
    every tune slot's."""
    source = study.lr.tune_sizes[0]
    chosen = {}
    for entry in study.schemes:
        for size in (s.name for s in study.sizes):
            if size in study.lr.tune_sizes:
                chosen[entry, size] = choose_lr(grid_losses(study, slots, results, entry, size))
    for entry in study.schemes:
        for size in (s.name for s in study.sizes):
            if size not in study.lr.tune_sizes:
                scale = width(study, source) / width(study, size) if study.lr.transfer == "inverse_width" else 1.0
                chosen[entry, size] = chosen[entry, source] * scale
    return chosen
