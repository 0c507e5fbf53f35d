"""A study file (TOML, read with the standard library's tomllib; the format is in docs/study.md)
-> a checked, frozen `Study`. Every mistake is a ValueError naming the key, its value and what
is allowed; nothing here builds a model or touches data.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import tomllib
from typing import Any

from jax_residual.connections import method_names
from jax_residual.data.tokenizer import parse_spec
from jax_residual.train import sweep
from jax_residual.train.run_config import SIZE_FIELDS, RunConfig

REFERENCE = sweep.REFERENCE  # "standard": the curve every multiplier is read from
BUDGETS = ("flops", "steps")
TRANSFERS = ("constant", "inverse_width")
# RunConfig fields a study sets itself, per run (so [train] may not; its model sizes are the
# defaults that each [[sizes]] entry overrides)
STUDY_SET = frozenset({"method", "knobs", "lr", "seed", "data_seed", "steps", "output_dir", "data", "tokenizer",
                       "decay_steps", "init_from_hf", "inject_nan_at"})
TOP_KEYS = {"name", "output_dir", "seeds", "schemes", "schemes_if_registered", "budgets", "step_matched_seeds", "bootstrap",
            "standard_compute_multiples", "data", "train", "lr", "sizes"}


@dataclasses.dataclass(frozen=True)
class Size:
    """A rung of the ladder: model sizes overriding the [train] preset's, and `steps`, the steps
    `standard` trains at this size (the size's FLOP budget is standard's FLOPs for them)."""

    name: str
    steps: int
    overrides: tuple[tuple[str, int], ...]  # (RunConfig size field, value)


@dataclasses.dataclass(frozen=True)
class LearningRates:
    grid: tuple[float, ...]  # ascending
    tune_sizes: tuple[str, ...]  # sizes whose grid runs choose their own lr
    check_sizes: tuple[str, ...]  # sizes where the grid also runs, to check the transferred lr (not used)
    tune_seeds: int  # the first `tune_seeds` of the study's seeds run the grid
    transfer: str  # from tune_sizes[0] to the other sizes: "constant" or "inverse_width"


@dataclasses.dataclass(frozen=True)
class Study:
    name: str
    output_dir: pathlib.Path
    schemes: tuple[str, ...]  # sweep entries METHOD[:KNOB=VALUE...], standard first
    skipped: tuple[str, ...]  # schemes_if_registered entries whose method is not registered
    sizes: tuple[Size, ...]
    lr: LearningRates
    seeds: tuple[int, ...]
    budgets: tuple[str, ...]  # the first is the one the lr is tuned under
    step_matched_seeds: int  # the first this many seeds run the "steps" budget (standard: every seed)
    standard_compute_multiples: tuple[float, ...]  # standard also trains multiple x steps, for its curve
    bootstrap: int
    source: str | None  # the raw data source (None: the standard library)
    tokenizer: str
    eval_bytes: int  # per split: the first documents of validation and test, up to this many bytes
    train: RunConfig  # the shared settings ([train]); method, lr, seed, steps, sizes are set per run

    def size(self, name: str) -> Size:
        return next(s for s in self.sizes if s.name == name)


def _need(condition: bool, message: str):
    if not condition:
        raise ValueError(message)


def _keys(table: dict, allowed: set, where: str):
    unknown = sorted(set(table) - allowed)
    _need(not unknown, f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")


def _positive_int(value, what: str) -> int:
    _need(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
          f"{what} must be an integer >= 1, got {value!r}")
    return value


def _numbers(values, what: str, at_least: int = 1) -> tuple[float, ...]:
    ok = (isinstance(values, list) and len(values) >= at_least
          and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0 for v in values))
    _need(ok, f"{what} must be a list of at least {at_least} positive numbers, got {values!r}")
    _need(len(set(values)) == len(values), f"{what} has repeated values: {values!r}")
    return tuple(float(v) for v in values)


def _entries(values, what: str) -> tuple[str, ...]:
    _need(isinstance(values, list) and all(isinstance(v, str) for v in values),
          f"{what} must be a list of sweep entries (strings METHOD[:KNOB=VALUE]), got {values!r}")
    return tuple(values)


def parse_sizes(tables) -> tuple[Size, ...]:
    _need(isinstance(tables, list) and tables, f"[[sizes]]: need at least one size, got {tables!r}")
    sizes = []
    for k, table in enumerate(tables):
        where = f"[[sizes]] #{k + 1}"
        _keys(table, {"name", "steps", *SIZE_FIELDS}, where)
        _need(isinstance(table.get("name"), str) and table["name"], f"{where}: needs a name (a string)")
        steps = _positive_int(table.get("steps"), f"{where} ({table['name']}): steps")
        overrides = tuple((f, _positive_int(table[f], f"{where}: {f}")) for f in SIZE_FIELDS if f in table)
        sizes.append(Size(table["name"], steps, overrides))
    names = [s.name for s in sizes]
    _need(len(set(names)) == len(names), f"[[sizes]]: names must differ, got {names}")
    return tuple(sizes)


def parse_lr(table: dict, sizes: tuple[Size, ...], seeds: tuple[int, ...]) -> LearningRates:
    _keys(table, {"grid", "tune_sizes", "check_sizes", "tune_seeds", "transfer"}, "[lr]")
    grid = tuple(sorted(_numbers(table.get("grid"), "[lr] grid")))
    names = [s.name for s in sizes]
    tune = tuple(table.get("tune_sizes", names))
    check = tuple(table.get("check_sizes", ()))
    for key, chosen in (("tune_sizes", tune), ("check_sizes", check)):
        unknown = [n for n in chosen if n not in names]
        _need(not unknown, f"[lr] {key}: unknown size(s) {unknown}; sizes: {names}")
    _need(bool(tune), "[lr] tune_sizes: need at least one size")
    _need(not set(tune) & set(check), f"[lr] check_sizes {list(check)} may not be tuned sizes {list(tune)}")
    transfer = table.get("transfer", "constant")
    _need(transfer in TRANSFERS, f"[lr] transfer: {transfer!r}; allowed: {', '.join(TRANSFERS)}")
    tune_seeds = _positive_int(table.get("tune_seeds", 1), "[lr] tune_seeds")
    _need(tune_seeds <= len(seeds), f"[lr] tune_seeds {tune_seeds} exceeds the {len(seeds)} seeds")
    return LearningRates(grid, tune, check, tune_seeds, transfer)


def parse_train(table: dict) -> RunConfig:
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    _keys(table, fields - STUDY_SET, "[train]")
    try:
        return RunConfig(**table)
    except TypeError as error:
        raise ValueError(f"[train]: {error}") from None


def parse_study(values: dict[str, Any], path: pathlib.Path | None = None) -> Study:
    """A Study from the parsed TOML `values` (path: the file, to name the default output folder)."""
    _keys(values, TOP_KEYS, "study file")
    name = values.get("name") or (path.stem if path else "study")
    seeds = tuple(values.get("seeds", [0]))
    _need(seeds and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)
          and len(set(seeds)) == len(seeds), f"seeds must be distinct integers >= 0, got {values.get('seeds')!r}")
    schemes = _entries(values.get("schemes", []), "schemes")
    optional = _entries(values.get("schemes_if_registered", []), "schemes_if_registered")
    registered = set(method_names())
    skipped = tuple(e for e in optional if e.split(":")[0] not in registered)
    schemes = schemes + tuple(e for e in optional if e not in skipped)
    for entry in schemes:
        sweep.parse_entry(entry)  # a known method and knobs it reads, else ValueError
    _need(REFERENCE in schemes, f"schemes must include {REFERENCE!r} (the reference curve), got {list(schemes)}")
    _need(len(set(schemes)) == len(schemes), f"schemes has repeated entries: {list(schemes)}")
    schemes = (REFERENCE, *(e for e in schemes if e != REFERENCE))
    budgets = tuple(values.get("budgets", ["flops", "steps"]))
    _need(budgets and set(budgets) <= set(BUDGETS) and len(set(budgets)) == len(budgets),
          f"budgets must be distinct values of {list(BUDGETS)}, got {list(budgets)}")
    step_seeds = _positive_int(values.get("step_matched_seeds", len(seeds)), "step_matched_seeds")
    _need(step_seeds <= len(seeds), f"step_matched_seeds {step_seeds} exceeds the {len(seeds)} seeds")
    multiples = tuple(sorted(_numbers(values.get("standard_compute_multiples", [1.0]), "standard_compute_multiples")))
    _need(1.0 in multiples, f"standard_compute_multiples must include 1, got {list(multiples)}")
    data = values.get("data", {})
    _keys(data, {"source", "tokenizer", "eval_bytes"}, "[data]")
    tokenizer = parse_spec(data.get("tokenizer", "bytes"))
    train = parse_train(values.get("train", {}))
    sizes = parse_sizes(values.get("sizes"))
    output = pathlib.Path(values.get("output_dir") or f"runs/study-{name}")
    return Study(name=name, output_dir=output, schemes=schemes, skipped=skipped, sizes=sizes,
                 lr=parse_lr(values.get("lr", {}), sizes, seeds), seeds=seeds, budgets=budgets,
                 step_matched_seeds=step_seeds,
                 standard_compute_multiples=multiples,
                 bootstrap=_positive_int(values.get("bootstrap", 2000), "bootstrap"),
                 source=data.get("source"), tokenizer=tokenizer,
                 eval_bytes=_positive_int(data.get("eval_bytes", 1 << 16), "[data] eval_bytes"), train=train)


def load_study(path, output_dir: str | None = None, seeds: list[int] | None = None) -> Study:
    """The Study of a TOML file; `output_dir` replaces its output folder, `seeds` its seeds (a
    replica of the study on other seeds: tuned and reported afresh)."""
    path = pathlib.Path(path)
    try:
        values = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"{path}: not valid TOML: {error}") from None
    study = parse_study(values if seeds is None else values | {"seeds": seeds}, path)
    return dataclasses.replace(study, output_dir=pathlib.Path(output_dir)) if output_dir else study
