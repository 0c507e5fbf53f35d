"""Compute multipliers (docs/study.md, SPEC Part E): how much more training compute `standard`
would need to reach a scheme's test loss, with bootstrap intervals over seeds.

`standard`'s test loss against training FLOPs over the ladder, L(C), is read off the lower
envelope of its points (a point that costs more than another and does no better is dominated:
to reach a loss, standard would spend its compute the cheaper way), fitted there by a saturating
power law

    L(C) = E + A * (C / C0)^-alpha        A > 0, alpha in (ALPHA_MIN, ALPHA_MAX), C0 = min C

in plain numpy (no scipy at run time): for a fixed alpha the model is linear in (E, A), solved in
closed form, so the fit is a one-dimensional search over alpha (a log-spaced grid, then golden
section around the best grid point; "variable projection"). The fit is *poor* when it is not
admissible (A <= 0, or the best alpha on the boundary of its range: no saturating power law fits
better than a straight line in log C), or when some point's residual exceeds POOR_RESIDUAL of its
loss; then L(C) is the piecewise-linear interpolation in log C of the points instead
(`LogLinear`), extended along its end segments. With three points and three parameters the
power law passes through them exactly: its shape is then an assumption, not a check.

The multiplier of a scheme S of cost C_S and loss L_S is M_S = C_standard(L_S) / C_S, the
inverse of the curve at L_S over S's cost: M > 1 means S reaches its loss with less compute
than standard would need. Its 95% interval is the percentile bootstrap over seeds: each
replicate resamples S's seeds and standard's seeds (with replacement; standard's seed indices
are drawn once per replicate and used at every point of its curve, a seed being the unit of a
replicate study), refits the curve by the same rule and recomputes M. The step-matched gap is
a difference of seed means with the same resampling.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

ALPHA_MIN, ALPHA_MAX = 1e-3, 4.0
ALPHA_GRID = 400  # log-spaced grid points before the golden-section refinement
GOLDEN_ITERATIONS = 60  # the bracket shrinks by 0.618 per iteration: far below float64 precision of alpha
POOR_RESIDUAL = 0.01  # a power law missing a point by more than 1% of its loss is a poor fit
CONFIDENCE = 0.95


# ----------------------------------------------------------------------------- the curves


@dataclasses.dataclass(frozen=True)
class PowerLaw:
    """L(C) = E + A (C / c0)^-alpha."""

    E: float
    A: float
    alpha: float
    c0: float
    kind = "power law"

    def loss(self, compute):
        return self.E + self.A * (np.asarray(compute, np.float64) / self.c0) ** -self.alpha

    def compute_for(self, loss: float) -> float:
        """C with L(C) = loss; inf at or below the asymptote E (no compute reaches it)."""
        if loss <= self.E:
            return np.inf
        return float(self.c0 * ((loss - self.E) / self.A) ** (-1.0 / self.alpha))


@dataclasses.dataclass(frozen=True)
class LogLinear:
    """L(C) linear in log C between the points (C ascending), extended along the end segments."""

    compute: tuple[float, ...]
    losses: tuple[float, ...]
    kind = "log-linear interpolation"

    def loss(self, compute):
        logs, values = np.log(self.compute), np.asarray(self.losses)
        x = np.log(np.asarray(compute, np.float64))
        inside = np.interp(x, logs, values)
        left = values[0] + (x - logs[0]) * (values[1] - values[0]) / (logs[1] - logs[0])
        right = values[-1] + (x - logs[-1]) * (values[-1] - values[-2]) / (logs[-1] - logs[-2])
        return np.where(x < logs[0], left, np.where(x > logs[-1], right, inside))

    def compute_for(self, loss: float) -> float:
        """The least C with L(C) = loss on the piecewise-linear curve (its first crossing, so a
        non-monotone curve has one answer); inf when the curve never comes down to it."""
        logs, values = np.log(self.compute), np.asarray(self.losses)
        if loss >= values[0]:  # at or above the cheapest point: along the first segment backwards
            slope = (values[1] - values[0]) / (logs[1] - logs[0])
            return float(np.exp(logs[0] + (loss - values[0]) / slope)) if slope < 0 else float(self.compute[0])
        for k in range(1, len(values)):
            if values[k] <= loss:  # the first segment that crosses it
                t = (values[k - 1] - loss) / (values[k - 1] - values[k])
                return float(np.exp(logs[k - 1] + t * (logs[k] - logs[k - 1])))
        slope = (values[-1] - values[-2]) / (logs[-1] - logs[-2])  # below every point: extrapolate the last segment
        return float(np.exp(logs[-1] + (loss - values[-1]) / slope)) if slope < 0 else np.inf


@dataclasses.dataclass(frozen=True)
class Floor:
    """standard's cheapest point alone (no costlier point beats it): it reaches any loss >= its
    own at its cost, and none below it (a bootstrap replicate's envelope of one point)."""

    compute: float
    loss_at: float

    def compute_for(self, loss: float) -> float:
        return self.compute if loss >= self.loss_at else np.inf


@dataclasses.dataclass(frozen=True)
class Fit:
    """The curve used for standard (`power_law` if it is not poor, else `log_linear`; None when
    no costlier point beats standard's cheapest: then no multiplier is defined), the
    power-law fit (None: not admissible or not tried) and why a power law was or was not used."""

    curve: PowerLaw | LogLinear | None
    power_law: PowerLaw | None
    max_relative_residual: float | None
    reason: str


def _linear_fit(x: np.ndarray, y: np.ndarray):
    """Least squares of y [..., K] on [1, x] with x [..., K] (broadcast): (E, A, sum of squares)."""
    xm, ym = x.mean(-1, keepdims=True), y.mean(-1, keepdims=True)
    dx = x - xm
    slope = (dx * (y - ym)).sum(-1) / (dx * dx).sum(-1)
    intercept = ym[..., 0] - slope * xm[..., 0]
    sse = ((intercept[..., None] + slope[..., None] * x - y) ** 2).sum(-1)
    return intercept, slope, sse


def _profile_sse(log_alpha: np.ndarray, log_c: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Sum of squares of the best (E, A > 0) for each alpha = exp(log_alpha) [R] (one per row of
    y [R, K]); inf where the best A is not positive."""
    x = np.exp(-np.exp(log_alpha)[:, None] * log_c[None, :])
    _, slope, sse = _linear_fit(x, y)
    return np.where(slope > 0, sse, np.inf)


def fit_power_laws(compute: Sequence[float], losses: np.ndarray) -> list[PowerLaw | None]:
    """The least-squares power law of each row of losses [R, K] at the K costs `compute` (K >= 3
    distinct), vectorised over rows; None for a row where it is not admissible (A <= 0, or the
    best alpha at the boundary of [ALPHA_MIN, ALPHA_MAX])."""
    c = np.asarray(compute, np.float64)
    y = np.atleast_2d(np.asarray(losses, np.float64))
    if len(np.unique(c)) < 3 or y.shape[-1] != len(c):
        raise ValueError(f"a power-law fit needs losses at >= 3 distinct costs, got costs {list(c)}")
    c0 = float(c.min())
    log_c = np.log(c / c0)
    grid = np.linspace(np.log(ALPHA_MIN), np.log(ALPHA_MAX), ALPHA_GRID)
    sse = np.stack([_profile_sse(np.full(len(y), g), log_c, y) for g in grid], axis=1)  # [R, G]
    best = np.argmin(sse, axis=1)
    step = grid[1] - grid[0]
    low, high = grid[best] - step, grid[best] + step  # golden section inside the bracket around the grid minimum
    ratio = (np.sqrt(5.0) - 1.0) / 2.0
    for _ in range(GOLDEN_ITERATIONS):
        a, b = high - ratio * (high - low), low + ratio * (high - low)
        left_better = _profile_sse(a, log_c, y) <= _profile_sse(b, log_c, y)
        low, high = np.where(left_better, low, a), np.where(left_better, b, high)
    log_alpha = np.clip((low + high) / 2.0, grid[0], grid[-1])
    E, A, final = _linear_fit(np.exp(-np.exp(log_alpha)[:, None] * log_c[None, :]), y)
    boundary = (best == 0) | (best == len(grid) - 1)
    return [None if boundary[r] or not A[r] > 0 or not np.isfinite(final[r])
            else PowerLaw(float(E[r]), float(A[r]), float(np.exp(log_alpha[r])), c0) for r in range(len(y))]


def standard_fit(compute: Sequence[float], losses: Sequence[float], power_law: PowerLaw | None = None) -> Fit:
    """The curve of standard's mean test losses at costs `compute` (docstring of the module: a
    power law unless it is poor, then log-linear interpolation). `power_law`: its fit already
    made (fit_power_laws), else it is fitted here (needs >= 3 distinct costs; with fewer, or
    with 2, the interpolation is used)."""
    order = np.argsort(compute)
    c, y = np.asarray(compute, np.float64)[order], np.asarray(losses, np.float64)[order]
    if len(np.unique(c)) != len(c):
        raise ValueError(f"standard's curve needs one (mean) loss per cost, got costs {list(c)}")
    if len(c) < 2:
        raise ValueError(f"standard's curve needs losses at >= 2 costs, got {len(c)}")
    interpolation = LogLinear(tuple(map(float, c)), tuple(map(float, y)))
    if len(c) < 3:
        return Fit(interpolation, None, None, "2 points: log-linear interpolation")
    law = power_law or fit_power_laws(c, y[None])[0]
    if law is None:
        return Fit(interpolation, None, None, "power law not admissible (A <= 0 or alpha at the edge of its range)")
    residual = float(np.max(np.abs(law.loss(c) - y) / np.abs(y)))
    if residual > POOR_RESIDUAL:
        return Fit(interpolation, law, residual, f"power law poor (a point missed by {residual:.2%} > "
                                                  f"{POOR_RESIDUAL:.0%} of its loss)")
    exact = " (3 points, 3 parameters: exact)" if len(c) == 3 else ""
    return Fit(law, law, residual, f"power law, max residual {residual:.2%}{exact}")


def multiplier(curve, scheme_loss: float, scheme_compute: float) -> float:
    """M = C_standard(L_S) / C_S."""
    return curve.compute_for(scheme_loss) / scheme_compute


# ----------------------------------------------------------------------------- the bootstrap


def seed_resamples(values: np.ndarray, replicates: int, rng: np.random.Generator) -> np.ndarray:
    """Means over resampled seeds: values [..., n] (n seeds on the last axis) -> [replicates, ...],
    replicate r the mean of values[..., idx_r] with idx_r n indices drawn with replacement, the
    same draw for every leading index (one seed resample per replicate)."""
    values = np.asarray(values, np.float64)
    n = values.shape[-1]
    index = rng.integers(0, n, size=(replicates, n))
    return np.moveaxis(values[..., index].mean(-1), -1, 0)


def percentile_interval(replicates: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The (lower, upper) percentile interval of bootstrap replicates: order statistics at
    (1 -+ confidence) / 2 (numpy's "inverted_cdf", so infinite replicates are allowed)."""
    tail = (1.0 - confidence) / 2.0
    values = np.asarray(replicates, np.float64)
    return (float(np.quantile(values, tail, method="inverted_cdf")),
            float(np.quantile(values, 1.0 - tail, method="inverted_cdf")))


@dataclasses.dataclass(frozen=True)
class Estimate:
    """A point estimate (from the seed means) and its bootstrap interval."""

    value: float
    low: float
    high: float


@dataclasses.dataclass(frozen=True)
class StandardCurves:
    """standard's fit on its seed means, and one refitted curve per bootstrap replicate."""

    fit: Fit
    replicates: list


def envelope(compute: Sequence[float], losses: Sequence[float]) -> np.ndarray:
    """Indices of the points, by ascending cost, whose loss is below every cheaper point's: the
    least compute standard is seen to need for each loss (its runs' lower envelope). A costlier
    point that does no better (e.g. a deeper model trained for fewer steps than a shallower,
    cheaper one) is dominated: standard would not spend its compute that way."""
    kept, best = [], np.inf
    for k in np.argsort(compute, kind="stable"):
        if losses[k] < best:
            kept.append(int(k))
            best = losses[k]
    return np.asarray(kept)


def envelope_fits(compute: Sequence[float], losses: np.ndarray) -> list[tuple[np.ndarray, Fit | None]]:
    """For each row of mean losses [R, K]: (its envelope's indices, standard_fit of the envelope's
    points, or None when the envelope is the cheapest point alone). Rows with the same envelope
    share one vectorised power-law fit."""
    c = np.asarray(compute, np.float64)
    rows = np.atleast_2d(np.asarray(losses, np.float64))
    kept = [envelope(c, row) for row in rows]
    fits: list = [None] * len(rows)
    groups: dict[tuple, list[int]] = {}
    for r, k in enumerate(kept):
        groups.setdefault(tuple(k), []).append(r)
    for key, members in groups.items():
        k = np.asarray(key)
        if len(k) < 2:
            continue
        laws = fit_power_laws(c[k], rows[members][:, k]) if len(k) >= 3 else [None] * len(members)
        for r, law in zip(members, laws):
            fits[r] = standard_fit(c[k], rows[r, k], law)
    return list(zip(kept, fits))


def standard_curves(compute: Sequence[float], losses: np.ndarray, replicates: int,
                    rng: np.random.Generator) -> StandardCurves:
    """standard's curve (losses [K points, n seeds] at the K costs `compute`) through the envelope
    of its seed means, and `replicates` curves refitted on resampled seeds (the same seed draw at
    every point of a replicate; each replicate takes its own envelope; one of a single point is a
    `Floor`). No curve (Fit.curve None, no replicates) when no costlier point beats the cheapest:
    then "the compute standard needs to reach L" has no meaning."""
    c = np.asarray(compute, np.float64)
    losses = np.asarray(losses, np.float64)
    means = losses.mean(-1)
    rows = np.concatenate([means[None], seed_resamples(losses, replicates, rng)])  # [1 + B, K]
    (kept, fit), *resampled = envelope_fits(c, rows)
    if fit is None:
        return StandardCurves(Fit(None, None, None, f"undefined: standard's mean test loss at no costlier point is "
                                  f"below its cheapest point's ({means[kept[0]]:.4g}), so no multiplier is defined"), [])
    dominated = [k for k in np.argsort(c, kind="stable") if k not in kept]
    if dominated:
        off = ", ".join(f"{c[k]:.3g} FLOPs ({means[k]:.4g})" for k in dominated)
        fit = dataclasses.replace(fit, reason=f"{fit.reason}; through the {len(kept)} of {len(c)} points on "
                                              f"standard's lower envelope (dominated, off it: {off})")
    curves = [f.curve if f is not None else Floor(float(c[k[0]]), float(row[k[0]]))
              for (k, f), row in zip(resampled, rows[1:])]
    return StandardCurves(fit, curves)


def bootstrap_multiplier(curves: StandardCurves, scheme_losses: Sequence[float], scheme_compute: float,
                         rng: np.random.Generator) -> Estimate | None:
    """M_S from the seed means, and its percentile interval: replicate r pairs standard's curve r
    with a resample of the scheme's seeds (scheme_losses [m]). None when standard has no curve."""
    if curves.fit.curve is None:
        return None
    losses = np.asarray(scheme_losses, np.float64)
    resampled = seed_resamples(losses, len(curves.replicates), rng)
    values = [multiplier(curve, loss, scheme_compute) for curve, loss in zip(curves.replicates, resampled)]
    return Estimate(multiplier(curves.fit.curve, float(losses.mean()), scheme_compute), *percentile_interval(values))


def bootstrap_gap(scheme_losses: Sequence[float], standard_losses: Sequence[float], replicates: int,
                  rng: np.random.Generator) -> Estimate:
    """mean(scheme) - mean(standard) and its percentile interval, each side's seeds resampled
    independently (the step-matched gap: > 0 means the scheme is behind at equal steps)."""
    a, b = np.asarray(scheme_losses, np.float64), np.asarray(standard_losses, np.float64)
    difference = seed_resamples(a, replicates, rng) - seed_resamples(b, replicates, rng)
    return Estimate(float(a.mean() - b.mean()), *percentile_interval(difference))
