"""Statistics of a sweep over seeds: mean, sample standard deviation, Welch's t-test.

Plain numpy and math in float64 (no scipy at run time). The Student-t tail comes from the
regularised incomplete beta function, evaluated by its continued fraction (modified Lentz).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

_TINY = 1e-300  # keeps the continued fraction's denominators away from 0
_EPS = 1e-15  # relative convergence of the continued fraction
_MAX_TERMS = 500


def _values(values: Sequence[float], at_least: int, what: str) -> np.ndarray:
    """values as float64 [n]; ValueError unless n >= at_least and every value is finite."""
    array = np.asarray(values, np.float64)
    if array.ndim != 1 or len(array) < at_least:
        raise ValueError(f"{what} needs a flat list of at least {at_least} values, got {list(values)!r}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{what} needs finite values, got {list(values)!r}")
    return array


def mean(values: Sequence[float]) -> float:
    """Arithmetic mean of n >= 1 finite values."""
    return float(np.mean(_values(values, 1, "mean")))


def sample_std(values: Sequence[float]) -> float:
    """Sample standard deviation (ddof=1: divides by n - 1) of n >= 2 finite values."""
    return float(np.std(_values(values, 2, "sample_std"), ddof=1))


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of I_x(a, b) (Numerical Recipes 6.4), for x < (a + 1) / (a + b + 2)."""

    def clamp(value):
        return value if abs(value) > _TINY else _TINY

    c, d = 1.0, 1.0 / clamp(1.0 - (a + b) * x / (a + 1.0))
    fraction = d
    for m in range(1, _MAX_TERMS):
        even = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        odd = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        for numerator in (even, odd):
            d = 1.0 / clamp(1.0 + numerator * d)
            c = clamp(1.0 + numerator / c)
            fraction *= c * d
        if abs(c * d - 1.0) < _EPS:
            return fraction
    raise ArithmeticError(f"incomplete beta I_{x}({a}, {b}): continued fraction did not converge")


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b) = B(x; a, b) / B(a, b) for a, b > 0 and 0 <= x <= 1."""
    if not (a > 0 and b > 0 and 0.0 <= x <= 1.0):
        raise ValueError(f"regularized_incomplete_beta needs a, b > 0 and 0 <= x <= 1, got a={a}, b={b}, x={x}")
    if x in (0.0, 1.0):
        return x
    if x > (a + 1.0) / (a + b + 2.0):  # the fraction converges fast only below this point
        return 1.0 - regularized_incomplete_beta(b, a, 1.0 - x)
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    return math.exp(log_front) / a * _beta_continued_fraction(a, b, x)


def student_t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for T Student-t with df > 0 degrees of freedom: I_{df/(df+t^2)}(df/2, 1/2)."""
    if not df > 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    return regularized_incomplete_beta(df / 2.0, 0.5, df / (df + t * t))


def welch_p_value(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided p-value of Welch's t-test (unequal variances) that a and b have equal means.

    a, b: >= 2 finite values each. t = (mean a - mean b) / sqrt(s_a^2/n_a + s_b^2/n_b) with
    sample variances, Welch-Satterthwaite degrees of freedom. Both samples constant (no
    spread): 1.0 if the means are equal, else 0.0 (the limit of either sample spreading).
    """
    a, b = _values(a, 2, "welch_p_value"), _values(b, 2, "welch_p_value")
    error_a, error_b = np.var(a, ddof=1) / len(a), np.var(b, ddof=1) / len(b)  # squared standard errors
    difference = float(np.mean(a) - np.mean(b))
    if error_a + error_b == 0.0:
        return 1.0 if difference == 0.0 else 0.0
    t = difference / math.sqrt(error_a + error_b)
    df = (error_a + error_b) ** 2 / (error_a**2 / (len(a) - 1) + error_b**2 / (len(b) - 1))
    return student_t_two_sided_p(t, float(df))
