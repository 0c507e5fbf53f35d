#!/usr/bin/env python
"""Plant known bugs one at a time in a temporary copy of the repository and run, for each, the
tests that should catch it; report the survivors.

Each mutant is an exact source-text replacement (`old` -> `new`, `old` occurring exactly once
in its file) and a list of pytest node ids. Before anything runs, every mutant's `old` text is
looked up: a stale mutant (its text no longer in the file, or more than once) is an error,
never silently skipped. The copy holds the repository's tracked and untracked, non-ignored
files; pytest runs from the copy's root with the copy first on PYTHONPATH (checked: the copy's
`jax_residual` is the one imported), so the copy's own code is tested, subprocess training runs
included. The union of the selected mutants' tests first runs on the unmutated copy and must
pass (--no-baseline skips it).

    python dev/mutation_check.py                 # every mutant
    python dev/mutation_check.py --only eval_on_train_windows --only sweep_std_ddof0
    python dev/mutation_check.py --list          # the mutants and their tests

Exit status: 0 every mutant caught; 1 some mutant survived; 2 an error (stale mutant, unknown
name, failing baseline, a test run that neither passed nor failed).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Mutant:
    name: str
    area: str
    path: str  # relative to the repository root
    old: str
    new: str
    tests: tuple[str, ...]  # pytest node ids, relative to the repository root


MUTANTS = (
    Mutant("blocked_scan_reads_a_future_key", "attention", "jax_residual/kernels/attention.py",
           "_block_forward(xs[0], k, v, xs[1])", "_block_forward(xs[0], k, v, xs[1] + 1)",
           ("parity_tests/test_model_structure.py::test_attention_query_blocks_do_not_change_the_function[method1]",)),
    Mutant("blocked_scan_backward_drops_dk", "attention", "jax_residual/kernels/attention.py",
           "return (carry[0] + d_k_b, carry[1] + d_v_b), d_q_b", "return (carry[0], carry[1] + d_v_b), d_q_b",
           ("parity_tests/test_model_structure.py::test_attention_query_blocks_do_not_change_the_function[method1]",)),
    Mutant("decoding_sees_a_future_key", "decoding", "jax_residual/kernels/attention.py",
           "visible = jnp.arange(k.shape[-3])[None, :] <= jnp.asarray(positions)[:, None]",
           "visible = jnp.arange(k.shape[-3])[None, :] <= jnp.asarray(positions)[:, None] + 1",
           ("parity_tests/test_generate.py::test_cached_decoding_equals_the_full_sequence[method1]",)),
    Mutant("value_residual_swaps_its_lambdas", "values family", "jax_residual/connections/values.py",
           "lam[0] * v + lam[1] * first_values", "lam[1] * v + lam[0] * first_values",
           ("parity_tests/test_peers.py::test_jax_matches_torch_logits_loss_grads[value_residual-6]",)),
    Mutant("probs_state_forgets_the_scale", "attention stores", "jax_residual/stores.py",
           "A.causal_softmax(A.grouped_scores(q, k) * A.default_attention_scale(self.cfg.head_dim))",
           "A.causal_softmax(A.grouped_scores(q, k))",
           ("parity_tests/test_methods.py::test_jax_matches_torch_logits_loss_grads[method1-6-probs]",)),
    Mutant("rope_rotates_the_wrong_half", "model", "jax_residual/functional.py",
           "return jnp.concatenate([-second, first], axis=-1)", "return jnp.concatenate([second, -first], axis=-1)",
           ("parity_tests/test_hf_llama.py::test_jax_standard_equals_hf[False-6]",)),
    Mutant("method5_scales_at_layer_0", "scores family", "jax_residual/connections/scores.py",
           "jnp.where(l == 0, standard_scales(", "jnp.where(False, standard_scales(",
           ("parity_tests/test_methods.py::test_torch_and_jax_match_numpy_reference[method5.5]",)),
    Mutant("mean_divides_by_l_not_rerun_count", "rerun family", "jax_residual/connections/rerun.py",
           "sum_of_earlier(l, rerun, p) / jnp.maximum(jnp.sum(rerun), 1)",
           "sum_of_earlier(l, rerun, p) / jnp.maximum(l, 1)",
           ("parity_tests/test_rerun_knobs.py::test_knobs_match_torch_and_change_the_function[method4.1-1-2-none]",)),
    Mutant("remat_layer_backward_halves_layer_grads", "model", "jax_residual/stack.py",
           "return d_x, d_state, jax.tree.map(jnp.add, d_layers, d_p), d_cos, d_sin",
           "return d_x, d_state, jax.tree.map(lambda a, b: a + 0.5 * b, d_layers, d_p), d_cos, d_sin",
           ("parity_tests/test_model_structure.py::test_chunking_and_remat_do_not_change_the_function[method4.2-qk]",)),
    Mutant("denseformer_skips_the_newest_block", "dense family", "jax_residual/connections/dense.py",
           "return (j <= last) & jnp.where(", "return (j < last) & jnp.where(",
           ("parity_tests/test_peers.py::test_jax_matches_torch_logits_loss_grads[denseformer-6]",)),
    Mutant("hyper_connections_write_ignores_beta", "streams family", "jax_residual/connections/streams.py",
           "lambda out: mixed[1:] + beta * out", "lambda out: mixed[1:] + out",
           ("parity_tests/test_peers.py::test_jax_matches_torch_logits_loss_grads[hyper_connections-6]",)),
    Mutant("method_weights_decayed", "optimiser", "jax_residual/train/optim.py",
           '"method": 0.0}', '"method": weight_decay}',
           ("parity_tests/test_training.py::test_method_params_get_their_own_group_without_weight_decay",)),
    Mutant("grad_accum_divides_by_microbatch_size", "optimiser", "jax_residual/train/step.py",
           "g / batch.shape[0]", "g / batch.shape[1]",
           ("parity_tests/test_objective.py::test_train_step_loss_and_grads_match_torch[standard-3]",)),
    Mutant("objective_predicts_its_input", "objective", "jax_residual/train/step.py",
           "softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])",
           "softmax_cross_entropy_with_integer_labels(logits, tokens[:, :-1])",
           ("parity_tests/test_objective.py::test_train_step_loss_and_grads_match_torch[standard-3]",
            "parity_tests/test_objective.py::test_per_position_loss_is_causal[standard]",
            "parity_tests/test_training.py::test_honest_short_run_stays_above_the_leak_floor")),
    Mutant("objective_model_reads_the_targets", "objective", "jax_residual/train/step.py",
           'model.apply({"params": params}, tokens[:, :-1])', 'model.apply({"params": params}, tokens[:, 1:])',
           ("parity_tests/test_objective.py::test_train_step_loss_and_grads_match_torch[standard-3]",
            "parity_tests/test_training.py::test_honest_short_run_stays_above_the_leak_floor")),
    Mutant("train_batch_ignores_its_index", "data", "jax_residual/train/data.py",
           "np.random.default_rng([seed, index])", "np.random.default_rng([seed, 0])",
           ("parity_tests/test_data.py::test_batch_k_is_a_pure_function_of_seed_and_k_and_rows_partition_it",)),
    Mutant("split_leaks_validation_into_train", "data", "jax_residual/prepare.py",
           "by_split[split_of(raw, *_WORKER[\"fractions\"])].append((text, len(raw) + 1))",
           "by_split[split_of(raw, *_WORKER[\"fractions\"])].append((text, len(raw) + 1))\n"
           "        by_split[\"train\"].append((text, len(raw) + 1))",
           ("parity_tests/test_data.py::test_splits_are_disjoint_and_stable_when_documents_are_added",)),
    Mutant("window_off_by_one_at_a_shard_boundary", "data", "jax_residual/data/shards.py",
           "take = min(length, self.counts[shard] - offset)", "take = min(length, self.counts[shard] - offset - 1)",
           ("parity_tests/test_data.py::test_windows_cross_shard_boundaries",
            "parity_tests/test_data.py::test_batches_equal_the_old_pipeline_on_the_same_stream")),
    Mutant("window_starts_one_late", "data", "jax_residual/train/data.py",
           "return tokens.windows(starts.reshape(-1), seq_len + 1)", "return tokens.windows(starts.reshape(-1) + 1, seq_len + 1)",
           ("parity_tests/test_data.py::test_batches_equal_the_old_pipeline_on_the_same_stream",)),
    Mutant("eval_on_train_windows", "evaluation", "jax_residual/train/loop.py",
           "data.validation_batches(corpus.validation,", "data.validation_batches(corpus.train,",
           ("parity_tests/test_data.py::test_evaluation_reads_only_validation_documents",)),
    Mutant("eval_reads_only_the_first_batch", "evaluation", "jax_residual/train/step.py",
           "next_token_loss(params, model, tokens), batches).mean()",
           "next_token_loss(params, model, tokens), batches)[0]",
           ("parity_tests/test_objective.py::test_eval_step_matches_torch_on_the_validation_windows",)),
    Mutant("resume_resets_the_optimiser_state", "checkpoint", "jax_residual/train/loop.py",
           "        latest, state, meta = restored\n",
           "        latest, state, meta = restored\n"
           "        state = state.replace(opt_state=jax.tree.map(jnp.zeros_like, state.opt_state))\n",
           ("parity_tests/test_training.py::test_checkpoint_from_8_devices_resumes_on_1",)),
    Mutant("preemption_save_skipped", "faults", "jax_residual/train/loop.py",
           "done == run.steps or stopping:", "done == run.steps:",
           ("parity_tests/test_faults.py::test_sigterm_saves_the_step_in_progress_and_resume_is_exact",)),
    Mutant("preemption_sync_point_bypassed", "faults", "jax_residual/train/faults.py",
           "return multihost_utils.reached_preemption_sync_point(step)", "return self.received is not None",
           ("parity_tests/test_faults.py::test_two_processes_agree_on_the_preemption_step",)),
    Mutant("partial_save_cleanup_removes_checkpoints", "faults", "jax_residual/train/checkpoint.py",
           'partial = sorted(directory.glob("*.orbax-checkpoint-tmp*"))', 'partial = sorted(directory.glob("*"))',
           ("parity_tests/test_faults.py::test_a_failed_save_keeps_the_previous_checkpoint_and_the_next_run_resumes"
            "[kill-None]",)),
    Mutant("sweep_std_ddof0", "sweeps", "jax_residual/train/stats.py",
           'np.std(_values(values, 2, "sample_std"), ddof=1)', 'np.std(_values(values, 2, "sample_std"), ddof=0)',
           ("parity_tests/test_stats.py::test_mean_and_sample_std_by_hand_and_against_numpy",
            "parity_tests/test_stats.py::test_sweep_rows_against_numpy_and_scipy")),
    Mutant("welch_uses_pooled_degrees_of_freedom", "sweeps", "jax_residual/train/stats.py",
           "df = (error_a + error_b) ** 2 / (error_a**2 / (len(a) - 1) + error_b**2 / (len(b) - 1))",
           "df = len(a) + len(b) - 2",
           ("parity_tests/test_stats.py::test_welch_p_value_matches_scipy",)),
    Mutant("rolling_windows_score_a_token_twice", "evaluation", "jax_residual/evaluate.py",
           "    predicted = first\n", "    predicted = first - 1\n",
           ("parity_tests/test_evaluate.py::test_rolling_windows_are_lm_evals[24-49]",)),
    Mutant("exported_eos_is_not_the_separator", "export", "jax_residual/convert.py",
           "eos = tokenizer.id_to_token(eos_token_id)", "eos = tokenizer.id_to_token(eos_token_id + 1)",
           ("parity_tests/test_evaluate.py::test_exported_folder_is_complete_for_autotokenizer[standard-bpe:300]",)),
    Mutant("plotted_curves_are_train_loss", "sweeps", "jax_residual/train/plots.py",
           'steps, losses = series(records, "val_loss")', 'steps, losses = series(records, "train_loss")',
           ("parity_tests/test_stats.py::test_plotted_curves_end_at_the_tables_per_seed_losses",)),
    Mutant("mudd_swaps_query_and_key_inputs", "multiway family", "jax_residual/connections/multiway.py",
           "ProjectionInputs(*stream[:3])", "ProjectionInputs(stream[1], stream[0], stream[2])",
           ("parity_tests/test_peers.py::test_jax_matches_torch_logits_loss_grads[mudd-6]",)),
    Mutant("dca_attention_residual_is_the_key_input", "multiway family", "jax_residual/connections/multiway.py",
           "jnp.stack([q + out, out])", "jnp.stack([k + out, out])",
           ("parity_tests/test_peers.py::test_jax_matches_torch_logits_loss_grads[dca-6]",)),
    Mutant("laurel_rw_drops_beta", "laurel family", "jax_residual/connections/laurel.py",
           "out, skip = alpha * out, beta * skip", "out, skip = alpha * out, skip",
           ("parity_tests/test_peers.py::test_jax_matches_torch_logits_loss_grads[laurel-6]",)),
    Mutant("attn_res_reads_the_partial_sum_of_a_new_block", "attn_res family", "jax_residual/connections/attn_res.py",
           "jnp.logical_not(done)[None]", "jnp.ones((1,), bool)",
           ("parity_tests/test_peers.py::test_jax_matches_torch_logits_loss_grads[attn_res-attn_res_blocks=2-6]",)),
    Mutant("attn_res_observed_weights_drop_the_partial_sum", "observed depth weights",
           "jax_residual/connections/attn_res.py", "mean[:-1].at[slot].add(mean[-1])", "mean[:-1]",
           ("parity_tests/test_depth_weights.py::test_observed_weights_match_torch_ref_activations[attn_res-attn_res_blocks=2]",)),
    Mutant("dca_observed_weights_are_the_static_bias", "observed depth weights", "jax_residual/connections/multiway.py",
           "gates[query].mean((0, 1)) + bias[query].mean(-1)", "bias[query].mean(-1)",
           ("parity_tests/test_depth_weights.py::test_observed_weights_match_torch_ref_activations[dca]",)),
    Mutant("mudd_observed_weights_are_the_query_streams", "observed depth weights",
           "jax_residual/connections/multiway.py", "plotted = weights[plotted_stream(ctx.cfg)]", "plotted = weights[0]",
           ("parity_tests/test_depth_weights.py::test_observed_weights_match_torch_ref_activations[mudd]",)),
    Mutant("study_selection_reads_the_test_split", "studies", "jax_residual/study/plan.py",
           'float(result["validation"]["loss"])', 'float(result["test"]["loss"])',
           ("parity_tests/test_study.py::test_lr_choice_reads_validation_only",)),
    Mutant("study_multiplier_inverted", "studies", "jax_residual/study/multipliers.py",
           "return curve.compute_for(scheme_loss) / scheme_compute",
           "return scheme_compute / curve.compute_for(scheme_loss)",
           ("parity_tests/test_study.py::test_a_planted_twice_as_efficient_scheme_has_multiplier_2",)),
    Mutant("study_curve_keeps_dominated_points", "studies", "jax_residual/study/multipliers.py",
           "        if losses[k] < best:", "        if True:",
           ("parity_tests/test_study.py::test_standard_curve_runs_through_its_lower_envelope",)),
    Mutant("keep_identity_drops_the_identity", "rerun family", "jax_residual/connections/rerun.py",
           "residual = stream + recomputed", "residual = recomputed",
           ("parity_tests/test_rerun_knobs.py::test_keep_identity_matches_torch_and_changes_the_function"
            "[method2-None-1-layer]",)),
)


# ----------------------------------------------------------------------------- the copy


def repository_files(root: pathlib.Path) -> list[str]:
    """Tracked and untracked, non-ignored files of the repository at root (relative paths)."""
    listing = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                             capture_output=True, check=True).stdout.decode()
    return [name for name in listing.split("\0") if name and (root / name).is_file()]


def copy_repository(root: pathlib.Path, target: pathlib.Path):
    for name in repository_files(root):
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, target / name)


def stale_mutants(mutants, root: pathlib.Path) -> list[str]:
    """A message per mutant whose file is missing or whose `old` text is not there exactly once."""
    problems = []
    for m in mutants:
        path = root / m.path
        count = path.read_text().count(m.old) if path.is_file() else None
        if count != 1:
            found = "the file is missing" if count is None else f"its text occurs {count} times, not once"
            problems.append(f"stale mutant {m.name}: in {m.path} {found}: {m.old!r}")
    return problems


def environment(copy: pathlib.Path) -> dict:
    """os.environ with the copy first on PYTHONPATH."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(copy), *filter(None, [env.get("PYTHONPATH")])])
    return env


def imported_package(copy: pathlib.Path) -> pathlib.Path:
    """Where `import jax_residual` resolves when run as the tests are run."""
    out = subprocess.run([sys.executable, "-c", "import jax_residual; print(jax_residual.__file__)"], cwd=copy,
                         env=environment(copy), capture_output=True, text=True, check=True).stdout
    return pathlib.Path(out.strip()).resolve()


# ----------------------------------------------------------------------------- running tests


@dataclasses.dataclass
class Outcome:
    status: str  # "caught", "SURVIVED", "ERROR", "passed" (baseline)
    failed: list[str]
    seconds: float
    output: str


def run_tests(copy: pathlib.Path, tests: tuple[str, ...]) -> Outcome:
    """pytest on `tests` from the copy's root: caught (some failed), SURVIVED (all passed) or
    ERROR (pytest could not run them: a missing node id, a collection error, ...)."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rf", *tests],
                            cwd=copy, env=environment(copy), capture_output=True, text=True)
    output = result.stdout + result.stderr
    failed = re.findall(r"^FAILED (\S+)", output, flags=re.MULTILINE)
    status = {0: "SURVIVED", 1: "caught"}.get(result.returncode, "ERROR")
    if status == "caught" and not failed:
        status = "ERROR"
    return Outcome(status, failed, time.perf_counter() - start, output)


@contextlib.contextmanager
def mutated(copy: pathlib.Path, mutant: Mutant):
    """The copy with `mutant` planted for the duration of the block, then restored."""
    path = copy / mutant.path
    original = path.read_text()
    path.write_text(original.replace(mutant.old, mutant.new, 1))
    try:
        yield
    finally:
        path.write_text(original)


def select(names: list[str] | None) -> list[Mutant]:
    by_name = {m.name: m for m in MUTANTS}
    unknown = sorted(set(names or ()) - by_name.keys())
    if unknown:
        raise SystemExit(f"unknown mutant(s) {unknown}; known: {', '.join(by_name)}")
    return [by_name[n] for n in names] if names else list(MUTANTS)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", metavar="NAME", help="run only this mutant (repeatable)")
    parser.add_argument("--list", action="store_true", help="list the mutants and their tests, run nothing")
    parser.add_argument("--no-baseline", action="store_true", help="skip the run of the tests on the unmutated copy")
    args = parser.parse_args(argv)
    try:
        mutants = select(args.only)
    except SystemExit as error:
        print(error, file=sys.stderr)
        return 2
    if args.list:
        for m in mutants:
            print(f"{m.name} [{m.area}] {m.path}\n    " + "\n    ".join(m.tests))
        return 0
    stale = stale_mutants(mutants, ROOT)
    if stale:
        print("\n".join(stale), file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory(prefix="mutation-") as folder:
        copy = pathlib.Path(folder)
        copy_repository(ROOT, copy)
        package = imported_package(copy)
        if copy.resolve() not in package.parents:
            print(f"the copy imports jax_residual from {package}, not from {copy}", file=sys.stderr)
            return 2
        print(f"copy of {ROOT} in {copy}; {len(mutants)} mutant(s)", flush=True)
        if not args.no_baseline:
            union = tuple(dict.fromkeys(t for m in mutants for t in m.tests))
            baseline = run_tests(copy, union)
            print(f"baseline (unmutated, {len(union)} tests): "
                  f"{'passed' if baseline.status == 'SURVIVED' else baseline.status} in {baseline.seconds:.0f} s",
                  flush=True)
            if baseline.status != "SURVIVED":
                print(baseline.output[-4000:], file=sys.stderr)
                return 2
        outcomes = {}
        for m in mutants:
            with mutated(copy, m):
                outcome = outcomes[m.name] = run_tests(copy, m.tests)
            detail = ", ".join(outcome.failed) if outcome.status == "caught" else outcome.output[-1500:]
            print(f"{outcome.status:8} {m.name} [{m.area}] ({outcome.seconds:.0f} s): {detail}", flush=True)

    counts = {s: sum(o.status == s for o in outcomes.values()) for s in ("caught", "SURVIVED", "ERROR")}
    print(f"\n{counts['caught']} caught, {counts['SURVIVED']} survived, {counts['ERROR']} errors "
          f"of {len(outcomes)} mutants")
    for name, o in outcomes.items():
        if o.status != "caught":
            print(f"  {o.status}: {name}")
    return 2 if counts["ERROR"] else 1 if counts["SURVIVED"] else 0


if __name__ == "__main__":
    sys.exit(main())
