"""Running a study: this worker's slots, stage by stage, each run trained by the training loop
(`loop.plan` + `loop.train`, resuming from its checkpoints) and then scored by the evaluator
(`evaluate.evaluate_splits`) on the validation and test documents.

A run's record is its result file, `study_result.json` in its folder, written atomically (a
temporary file renamed over it) when the run has trained and been scored: a run with a result
file is finished and is never trained again (its identity is checked against the study's), a
folder without one is a run in progress or interrupted (the next invocation resumes it from its
last checkpoint). The report stage needs every tune result: a worker that finishes its tune
slots first polls the folder for the others' result files (`poll_seconds`; 0: it stops and says
what it waits for; rerunning the same command continues).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import time
from typing import Callable

from jax_residual import evaluate, prepare
from jax_residual.data import shards
from jax_residual.study import plan as plans
from jax_residual.study.spec import Study
from jax_residual.train import flops, loop, sweep
from jax_residual.train.run_config import RunConfig, identity

RESULT_FILE = "study_result.json"
SPLITS = ("validation", "test")


class Waiting(RuntimeError):
    """This worker has run its share and needs other workers' results to go on."""


# ----------------------------------------------------------------------------- results on disk


def read_result(folder: pathlib.Path) -> dict | None:
    path = pathlib.Path(folder) / RESULT_FILE
    return json.loads(path.read_text()) if path.exists() else None


def write_result(folder: pathlib.Path, result: dict):
    """The result file, written whole or not at all (a temporary file renamed over it)."""
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    temporary = folder / (RESULT_FILE + ".tmp")
    temporary.write_text(json.dumps(result, indent=1))
    os.replace(temporary, folder / RESULT_FILE)


def check_identity(result: dict, run: RunConfig, folder: pathlib.Path):
    """ValueError unless a finished run's recorded identity is `run`'s (the study file changed)."""
    now = json.loads(json.dumps(identity(run)))
    before = result.get("identity", {})
    changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
    if changed:
        details = ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed)
        raise ValueError(f"{folder} holds a finished run of other settings ({details}); use another output_dir "
                         f"or the settings it was run with")


# ----------------------------------------------------------------------------- one run


def evaluation_documents(study: Study) -> dict[str, list[str]]:
    """split -> its documents in source order, split as prepare splits them
    (evaluate.load_documents), up to `eval_bytes` bytes of UTF-8: the document that crosses the
    limit is cut there (at a character boundary). The same documents for every run."""
    chosen = {}
    for split in SPLITS:
        documents, left = [], study.eval_bytes
        for text in evaluate.load_documents(study.source, split):
            if left <= 0:
                break
            raw = text.encode()
            piece = raw if len(raw) <= left else raw[:left].decode(errors="ignore").encode()
            documents.append(piece.decode())
            left -= len(raw)
        chosen[split] = [d for d in documents if d]
    return chosen


def train_and_evaluate(run: RunConfig, documents: dict[str, list[str]], log=print) -> dict:
    """Train `run` (resuming from its checkpoints) and score its final checkpoint on `documents`
    (split -> texts): the result file's content. A run whose loss stops being finite is a
    finished, diverged run (losses +inf)."""
    p = loop.plan(run)
    try:
        result = loop.train(p, log=log)
    except loop.NonFiniteLoss as error:
        log(f"diverged: {error}")
        return {"diverged": True, "error": str(error), "flops_per_token": flops.flops_per_token(p.cfg, run.seq_len),
                **{split: {"loss": math.inf} for split in documents}}
    scores = evaluate.evaluate_splits(p.folder, documents, max_length=run.seq_len, progress=False, warn=log)
    return {"diverged": False, "flops_per_token": result.flops_per_token, "num_params": result.num_params,
            "tokens_per_s": sweep.measured_tokens_per_s(result), "wall_s": result.wall_s,
            "final_train_loss": result.final_train_loss, "final_val_loss": result.final_val_loss,
            "method_params": {name: value.tolist() for name, value in result.method_params.items()},
            "depth_weights": None if result.depth_weights is None else result.depth_weights.tolist(),
            **{split: scores[split] for split in documents}}


# ----------------------------------------------------------------------------- progress


@dataclasses.dataclass
class Progress:
    done: int
    running: int  # a folder without a result: training now, or interrupted
    left: int
    eta_s: float | None

    def line(self) -> str:
        eta = "unknown" if self.eta_s is None else time.strftime("%H:%M:%S", time.gmtime(self.eta_s))
        return f"study: {self.done} done, {self.running} running, {self.left} left; ETA {eta}"


def current_choice(study: Study, slots: list[plans.Slot]) -> dict | None:
    """The chosen learning rates once every tune slot has a result, else None."""
    if not complete(study, slots, None, "tune"):
        return None
    return plans.chosen_lrs(study, slots, results_of(study, slots, None))


def progress(study: Study, slots: list[plans.Slot], workers: int) -> Progress:
    """Counts over every slot, and the time left (`estimate_seconds` of each unfinished slot,
    divided by the workers)."""
    chosen = current_choice(study, slots)
    done, running, left, finished = 0, 0, [], []
    for s in slots:
        lr = s.lr if s.lr is not None else (chosen or {}).get((s.entry, s.size))
        folder = None if lr is None else plans.run_folder(study, s.entry, s.size, lr, s.steps, s.seed)
        result = None if folder is None else read_result(folder)
        if result is not None:
            done += 1
            if not result.get("diverged"):
                finished.append((s, result))
            continue
        running += folder is not None and folder.exists()
        left.append(s)
    estimates = [estimate_seconds(study, s, finished) for s in left]
    eta = None if any(e is None for e in estimates) else sum(estimates) / workers
    return Progress(done, running, len(left) - running, eta)


def training_flops(study: Study, slot: plans.Slot) -> float:
    return plans.flops_per_token(study, slot.entry, slot.size) * study.train.tokens_per_step * slot.steps


def estimate_seconds(study: Study, slot: plans.Slot, finished: list[tuple[plans.Slot, dict]]) -> float | None:
    """The run time of an unfinished slot from the finished runs (slot, result): the measured
    seconds per step of its scheme and size; else the seconds per training FLOP of its scheme at
    the largest size where it has finished runs (a scheme's speed is its own: hyper-connections
    move more memory per FLOP; the largest size, where a run's fixed cost, its compilation, weighs
    least); else those of all finished runs at the largest size that has any; None before any."""
    same = [(s, r) for s, r in finished if (s.entry, s.size) == (slot.entry, slot.size)]
    if same:
        return sum(r["wall_s"] for _, r in same) / sum(s.steps for s, _ in same) * slot.steps
    rank = {size.name: k for k, size in enumerate(study.sizes)}
    for runs in ([(s, r) for s, r in finished if s.entry == slot.entry], finished):
        if runs:
            largest = max(rank[s.size] for s, _ in runs)
            runs = [(s, r) for s, r in runs if rank[s.size] == largest]
            return sum(r["wall_s"] for _, r in runs) / sum(training_flops(study, s) for s, _ in runs) * \
                training_flops(study, slot)
    return None


# ----------------------------------------------------------------------------- the study


def prepare_data(study: Study, worker: int, poll_seconds: float, log):
    """The study's corpus, prepared once into <output_dir>/data by worker 0 (the others wait)."""
    folder = plans.data_folder(study)
    if shards.is_prepared(folder):
        return
    if worker == 0:
        prepare.prepare(study.source, folder, prepare.Settings(prepare.source_name(study.source), study.tokenizer),
                        log=log)
        return
    wait_for(lambda: shards.is_prepared(folder), f"worker 0 to prepare {folder}", poll_seconds, log)


def wait_for(ready: Callable[[], bool], what: str, poll_seconds: float, log):
    """Return when ready(); poll every poll_seconds; with 0, raise Waiting at once."""
    while not ready():
        if not poll_seconds:
            raise Waiting(f"waiting for {what}: rerun this command when they are done")
        log(f"waiting for {what} (polling every {poll_seconds:g} s)")
        time.sleep(poll_seconds)


def results_of(study: Study, slots: list[plans.Slot], chosen: dict | None) -> dict[str, dict]:
    """run folder -> result of every slot that has one (report slots only once `chosen`)."""
    found = {}
    for s in slots:
        lr = s.lr if s.lr is not None else (chosen or {}).get((s.entry, s.size))
        if lr is not None:
            key = plans.slot_key(study, s, lr)
            result = read_result(pathlib.Path(key))
            if result is not None:
                found[key] = result
    return found


def complete(study: Study, slots: list[plans.Slot], chosen: dict | None, stage: str) -> bool:
    keys = results_of(study, slots, chosen).keys()
    return all(plans.slot_key(study, s, s.lr if s.lr is not None else chosen[s.entry, s.size]) in keys
               for s in slots if s.stage == stage)


def run_slot(study: Study, slot: plans.Slot, lr: float, train: Callable, documents: Callable, log) -> bool:
    """Train and score the slot unless its result exists; True when it trained."""
    run = plans.slot_run(study, slot, lr)
    folder = pathlib.Path(run.output_dir)
    existing = read_result(folder)
    if existing is not None:
        check_identity(existing, run, folder)
        return False
    log(f"\n=== study run {slot.index}: {slot.entry}, {slot.size}, lr {lr:g}, seed {slot.seed}, {slot.steps} steps "
        f"({slot.stage}; {', '.join(slot.budgets)}) ===")
    result = train(run, documents())
    write_result(folder, {"entry": slot.entry, "size": slot.size, "seed": slot.seed, "steps": slot.steps, "lr": lr,
                          "stage": slot.stage, "budgets": list(slot.budgets), "identity": identity(run), **result})
    return True


def run_study(study: Study, worker: int = 0, workers: int = 1, train: Callable = train_and_evaluate,
              poll_seconds: float = 60.0, log=print) -> dict:
    """Run this worker's share of the study (every slot whose index mod `workers` is `worker`),
    tune stage first. Returns {"chosen": (entry, size) -> lr, "results": folder -> result}
    once every slot has a result (worker 0 waits for the others; the others return after their
    share, with the results so far). train(run, documents) -> result dict: the trainer
    (default: the training loop and the evaluator)."""
    slots = plans.plan_slots(study)
    mine = plans.worker_slots(slots, worker, workers)
    prepare_data(study, worker, poll_seconds, log)
    cache = {}

    def documents():
        if not cache:
            cache.update(evaluation_documents(study))
        return cache

    chosen = None
    for stage in ("tune", "report"):
        if stage == "report":
            wait_for(lambda: complete(study, slots, None, "tune"), "the other workers' tune runs", poll_seconds, log)
            chosen = current_choice(study, slots)
        for s in (s for s in mine if s.stage == stage):
            lr = s.lr if s.lr is not None else chosen[s.entry, s.size]
            if run_slot(study, s, lr, train, documents, log):
                log(progress(study, slots, workers).line())
    if worker == 0:
        wait_for(lambda: complete(study, slots, chosen, "report"), "the other workers' report runs", poll_seconds, log)
    return {"chosen": chosen, "results": results_of(study, slots, chosen), "slots": slots}


def describe_plan(study: Study, slots: list[plans.Slot]) -> str:
    """The plan in a few lines: runs per stage and size, their training FLOPs, and the progress."""
    lines = [f"study {study.name}: {len(slots)} runs into {study.output_dir}"]
    for stage in ("tune", "report"):
        for size in study.sizes:
            chosen = [s for s in slots if s.stage == stage and s.size == size.name]
            if chosen:
                total = sum(training_flops(study, s) for s in chosen)
                steps = sorted({s.steps for s in chosen})
                lines.append(f"  {stage} {size.name}: {len(chosen)} runs, {total:.3g} training FLOPs, steps "
                             f"{steps[0]}-{steps[-1]}")
    if study.skipped:
        lines.append(f"  not registered, skipped: {', '.join(study.skipped)}")
    return "\n".join(lines)
