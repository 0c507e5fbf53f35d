"""Sweep statistics (jax_residual.train.stats, sweep.method_rows) against numpy/scipy on known
inputs, and the sweep's plotted curves against its table.

scipy is the independent oracle here only (the package computes the Student-t tail itself).
Tolerances: both sides float64; 1e-12 relative for the incomplete beta / p-values (the
continued fraction stops at 1e-15 per term), exact (1e-15) for mean and std.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.special
import scipy.stats

from jax_residual.train import plots, stats, sweep

P_RTOL = 1e-12

SAMPLES = [  # (a, b): equal and unequal sizes, spreads and means; a near-tie; a far-apart pair
    ([2.7687, 2.7488], [3.2184, 3.2149]),
    ([1.0, 2.0, 4.0], [1.5, 1.7, 1.6, 1.9, 1.2]),
    ([0.31, 0.29, 0.33, 0.30], [0.30, 0.32]),
    ([10.0, 10.1], [0.0, 0.1, 0.2]),
    ([5.0, 5.0, 5.0], [4.0, 5.0, 6.0]),  # one sample without spread
]


def test_mean_and_sample_std_by_hand_and_against_numpy():
    assert stats.mean([1.0, 2.0, 3.0, 4.0]) == 2.5
    assert stats.sample_std([1.0, 2.0, 3.0, 4.0]) == pytest.approx(np.sqrt(5.0 / 3.0), rel=1e-15)  # ddof=1
    assert stats.sample_std([2.0, 4.0]) == pytest.approx(np.sqrt(2.0), rel=1e-15)
    for a, b in SAMPLES:
        for values in (a, b):
            assert stats.mean(values) == pytest.approx(np.mean(values), rel=1e-15)
            assert stats.sample_std(values) == pytest.approx(np.std(values, ddof=1), rel=1e-15, abs=1e-15)


@pytest.mark.filterwarnings("ignore:Precision loss occurred")  # scipy, on the sample without spread
@pytest.mark.parametrize("a, b", SAMPLES)
def test_welch_p_value_matches_scipy(a, b):
    expected = scipy.stats.ttest_ind(a, b, equal_var=False).pvalue
    assert stats.welch_p_value(a, b) == pytest.approx(expected, rel=P_RTOL)
    assert stats.welch_p_value(b, a) == pytest.approx(expected, rel=P_RTOL)  # two-sided: symmetric


def test_welch_p_value_without_any_spread():
    assert stats.welch_p_value([1.0, 1.0], [1.0, 1.0, 1.0]) == 1.0
    assert stats.welch_p_value([1.0, 1.0], [2.0, 2.0]) == 0.0


def test_incomplete_beta_and_student_tail_match_scipy():
    grid = [(a, b, x) for a in (0.05, 0.5, 1.0, 3.7, 40.0) for b in (0.5, 1.0, 7.0) for x in (1e-6, 0.2, 0.5, 0.93)]
    for a, b, x in grid:
        assert stats.regularized_incomplete_beta(a, b, x) == pytest.approx(scipy.special.betainc(a, b, x),
                                                                           rel=P_RTOL, abs=1e-300), (a, b, x)
    for t, df in [(0.0, 1.0), (0.7, 1.3), (-2.5, 4.0), (8.0, 2.2), (3.1, 60.0)]:
        assert stats.student_t_two_sided_p(t, df) == pytest.approx(2 * scipy.stats.t.sf(abs(t), df), rel=P_RTOL)


@pytest.mark.parametrize("call, message", [
    (lambda: stats.sample_std([1.0]), "sample_std needs a flat list of at least 2 values"),
    (lambda: stats.welch_p_value([1.0, 2.0], [3.0]), "welch_p_value needs a flat list of at least 2 values"),
    (lambda: stats.mean([]), "mean needs a flat list of at least 1 values"),
    (lambda: stats.mean([1.0, float("nan")]), "mean needs finite values"),
    (lambda: stats.student_t_two_sided_p(1.0, 0.0), "degrees of freedom must be > 0"),
])
def test_bad_input_is_a_clear_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def records(val_losses: list[float]) -> list[dict]:
    """Metrics records of a run evaluated every 10 steps, with train-only steps between."""
    out = []
    for index, value in enumerate(val_losses):
        out += [{"step": 10 * index, "val_loss": value, "train_loss": value + 1.0},
                {"step": 10 * index + 5, "train_loss": value - 0.5}]
    return out


# method -> seed -> validation losses over the run; seeds deliberately out of order
CURVES = {
    "standard": {3: records([5.0, 3.1, 2.81]), 1: records([5.1, 3.0, 2.75]), 2: records([5.2, 3.2, 2.79])},
    "method2": {2: records([5.0, 3.5, 3.22]), 1: records([5.0, 3.4, 3.20]), 3: records([5.0, 3.6, 3.25])},
    "method5.5": {1: records([5.3, 2.9])},
}


def test_sweep_rows_against_numpy_and_scipy():
    rows = {row["method"]: row for row in sweep.method_rows(CURVES)}
    assert list(rows) == list(CURVES)
    standard = rows["standard"]
    assert standard["seeds"] == [1, 2, 3] and standard["final_val_loss"] == [2.75, 2.79, 2.81]
    assert standard["mean"] == pytest.approx(np.mean([2.75, 2.79, 2.81]), rel=1e-15)
    assert standard["std"] == pytest.approx(np.std([2.75, 2.79, 2.81], ddof=1), rel=1e-15)
    assert standard["p_vs_standard"] is None
    expected_p = scipy.stats.ttest_ind([3.20, 3.22, 3.25], [2.75, 2.79, 2.81], equal_var=False).pvalue
    assert rows["method2"]["p_vs_standard"] == pytest.approx(expected_p, rel=P_RTOL)
    one_seed = rows["method5.5"]  # one seed: no spread, no test
    assert one_seed["final_val_loss"] == [2.9] and one_seed["std"] is None and one_seed["p_vs_standard"] is None

    table = sweep.markdown_table(list(rows.values()))
    assert table.splitlines()[0].endswith("| p vs standard (Welch) |")
    assert f"| method2 | 3 | 3.2233 ± 0.0252 | 3.2000, 3.2200, 3.2500 | {expected_p:.3g} |" in table
    assert "| method5.5 | 1 | 2.9000 ± — | 2.9000 | — |" in table
    no_baseline = sweep.markdown_table(sweep.method_rows({"method2": CURVES["method2"]}))
    assert "Welch" not in no_baseline


def test_plotted_curves_end_at_the_tables_per_seed_losses():
    drawn = plots.validation_curves(CURVES)
    for row in sweep.method_rows(CURVES):
        by_seed = drawn[row["method"]]
        assert sorted(by_seed) == row["seeds"]
        for seed, final in zip(row["seeds"], row["final_val_loss"]):
            steps, losses = by_seed[seed]
            assert steps == [10 * i for i in range(len(steps))]  # the eval steps only
            assert losses[-1] == final
