"""How the book compares two arms: a difference, its confidence interval, and a verdict.

Every sentence in the book that names a winner is built here, by one rule
(``../shared/EVIDENCE.md``): a winner is named only when the confidence interval of the
difference excludes zero; otherwise the two arms are *indistinguishable at this budget* and
the interval says how large a difference the experiment could still hide.

Two designs, two functions:

* :func:`paired_difference` — arm ``a`` and arm ``b`` share their units: run ``i`` of both
  used seed ``i`` (the same batch order), or item ``i`` is the same test question. The
  analysis is of the per-unit differences ``d_i = a_i − b_i``: a t-interval over the pairs
  (default), a bootstrap over the pairs, or, for a ``(seeds, items)`` table, a two-level
  bootstrap that resamples seeds and questions. A difference of +0.009 on every one of three
  seeds is a clear loss even where the bands ``mean ± sd`` of the two arms overlap.
* :func:`independent_difference` — the arms share nothing (Welch's t-interval).

:func:`proportion_interval` is the Wilson interval of an accuracy ``k / n``;
:func:`mean_interval` the t-interval of one arm's mean; :func:`pareto_set` the runs no other
run beats on two lower-is-better measures at once. The statistics are :mod:`scipy.stats`'s.

    >>> d = paired_difference([0.0357, 0.0394, 0.0431], [0.0300, 0.0300, 0.0300])
    >>> d.winner            # b is better on every seed
    'b'
"""

from __future__ import annotations

import statistics
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import stats as _st

__all__ = [
    "Difference",
    "Interval",
    "compare",
    "independent_difference",
    "mean_interval",
    "mean_sd",
    "paired_difference",
    "pareto_set",
    "proportion_interval",
    "separated",
]

_METHODS = ("t", "bootstrap", "hierarchical")


@dataclass(frozen=True)
class Interval:
    """An estimate and its confidence interval ``[low, high]``."""

    estimate: float
    low: float
    high: float
    confidence: float = 0.95

    def text(self, digits: int = 3, scale: float = 1.0, unit: str = "") -> str:
        """``"0.052 (95 % CI 0.047 to 0.057)"``, each number multiplied by ``scale``."""
        u = f" {unit}" if unit else ""
        return (f"{self.estimate * scale:.{digits}f}{u} ({100 * self.confidence:.0f} % CI "
                f"{self.low * scale:.{digits}f} to {self.high * scale:.{digits}f})")


@dataclass(frozen=True)
class Difference:
    """The difference ``a − b`` of two arms, its interval, and which arm wins.

    Attributes:
        mean: the mean difference ``a − b`` (over pairs, or between the arms' means).
        low, high: its confidence interval.
        confidence: the interval's level (0.95 by default).
        n: the number of pairs (paired) or ``(len(a), len(b))`` as ``n`` and ``n_b``.
        lower_is_better: whether a smaller value of the measure is the better one.
        design: ``"paired"`` or ``"independent"``.
        method: ``"t"``, ``"bootstrap"``, ``"hierarchical"`` (paired) or ``"welch"``.
        differences: the per-pair differences (paired designs), for a reader to check.
    """

    mean: float
    low: float
    high: float
    confidence: float
    n: int
    lower_is_better: bool
    design: str
    method: str
    n_b: int | None = None
    differences: tuple[float, ...] = field(default=(), repr=False)

    @property
    def winner(self) -> str | None:
        """``"a"`` or ``"b"``, the better arm, or ``None`` when the interval contains 0."""
        if self.low <= 0.0 <= self.high:
            return None
        a_is_lower = self.high < 0.0
        return "a" if a_is_lower == self.lower_is_better else "b"

    @property
    def significant(self) -> bool:
        """True when the interval excludes zero."""
        return self.winner is not None

    def design_text(self) -> str:
        """``"paired over 3 seeds"``, ``"independent, 3 and 3 runs"`` and the like."""
        if self.design == "paired":
            how = {"t": "t-interval", "bootstrap": "bootstrap",
                   "hierarchical": "bootstrap over seeds and questions"}[self.method]
            return f"paired over {self.n} seeds, {how}"
        return f"independent, {self.n} and {self.n_b} runs, Welch t-interval"

    def interval_text(self, digits: int = 3, scale: float = 1.0, unit: str = "") -> str:
        """``"+0.0094 nats (95 % CI +0.0057 to +0.0131; paired over 3 seeds, t-interval)"``."""
        u = f" {unit}" if unit else ""

        def num(v: float) -> str:
            return f"{v * scale:+.{digits}f}".replace("-", "\u2212")  # a real minus sign

        return (f"{num(self.mean)}{u} ({100 * self.confidence:.0f} % CI {num(self.low)} to "
                f"{num(self.high)}; {self.design_text()})")

    def sentence(self, a: str, b: str, unit: str = "", digits: int = 3,
                 scale: float = 1.0, measure: str = "") -> str:
        """The verdict as a sentence, with the difference ``a − b`` and its interval.

        Args:
            a, b: the arms' names, in the order the difference was taken.
            unit: the unit after the numbers (``"nats"``, ``"points"``).
            digits: decimals shown.
            scale: multiplies every number (100 turns a fraction into points).
            measure: what was measured, e.g. ``"on test loss"``; placed after the verdict.
        """
        on = f" {measure}" if measure else ""
        diff = self.interval_text(digits, scale, unit)
        if self.winner is None:
            return (f"{a} and {b} are indistinguishable at this budget{on}: {a} − {b} = "
                    f"{diff}")
        better, worse = (a, b) if self.winner == "a" else (b, a)
        return f"{better} beats {worse}{on}: {a} − {b} = {diff}"


def _as_array(values: Sequence[float] | np.ndarray, name: str) -> np.ndarray:
    if isinstance(values, (str, bytes)):
        raise TypeError(f"{name} must be a sequence of numbers, got a string")
    try:
        array = np.asarray(values, dtype=float)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name} must be a sequence of numbers: {err}") from None
    if array.ndim not in (1, 2):
        raise ValueError(f"{name} must be 1-D (one value per seed) or 2-D (seeds × items), "
                         f"got shape {array.shape}")
    if np.isnan(array).any():
        raise ValueError(f"{name} contains NaN; drop or fix the failed runs before comparing")
    return array


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence!r}")


def _t_interval(d: np.ndarray, confidence: float) -> tuple[float, float]:
    """The t-interval of the mean of ``d`` (degenerate to a point when d has no spread)."""
    mean = float(d.mean())
    if np.ptp(d) == 0.0:  # every pair the same difference: no spread to estimate
        return mean, mean
    ci = _st.ttest_1samp(d, 0.0).confidence_interval(confidence)
    return float(ci.low), float(ci.high)


def _hierarchical(d: np.ndarray, confidence: float, n_resamples: int,
                  seed: int) -> tuple[float, float]:
    """Percentile interval of the mean of a ``(seeds, items)`` table of differences, from a
    bootstrap that resamples seeds and, independently, items (both with replacement)."""
    rng = np.random.default_rng(seed)
    n_seeds, n_items = d.shape
    means = np.empty(n_resamples)
    for i in range(n_resamples):
        rows = rng.integers(0, n_seeds, n_seeds)
        cols = rng.integers(0, n_items, n_items)
        means[i] = d[np.ix_(rows, cols)].mean()
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def paired_difference(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray,
                      lower_is_better: bool = True, confidence: float = 0.95,
                      method: str = "t", n_resamples: int = 9999,
                      seed: int = 0) -> Difference:
    """The mean of ``a − b`` over paired units and its confidence interval.

    Args:
        a, b: the two arms, unit ``i`` of each sharing seed or item ``i``: 1-D of length
            n ≥ 2, or 2-D ``(seeds, items)`` (each seed's per-item scores).
        lower_is_better: True for a loss, False for an accuracy.
        confidence: the interval's level.
        method: ``"t"`` — t-interval over the pairs (for 2-D input, over the per-seed means);
            ``"bootstrap"`` — :func:`scipy.stats.bootstrap` (BCa) over the pairs (1-D only);
            ``"hierarchical"`` — 2-D only: resample seeds and items.
        n_resamples, seed: the bootstrap's size and its random generator's seed.

    Raises:
        ValueError: unequal shapes, fewer than 2 pairs, NaN, an unknown method.
        TypeError: values that are not numbers.
    """
    _check_confidence(confidence)
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    x, y = _as_array(a, "a"), _as_array(b, "b")
    if x.shape != y.shape:
        raise ValueError(f"a paired comparison needs a and b of the same shape (unit i of a "
                         f"paired with unit i of b), got {x.shape} and {y.shape}; for arms "
                         f"that share nothing use independent_difference")
    if x.shape[0] < 2:
        raise ValueError(f"a paired comparison needs at least 2 pairs, got {x.shape[0]}; "
                         f"run more seeds")
    d = x - y
    if method == "hierarchical":
        if d.ndim != 2:
            raise ValueError("method='hierarchical' needs 2-D input (seeds × items)")
        low, high = _hierarchical(d, confidence, n_resamples, seed)
        per_unit = d.mean(axis=1)
    else:
        per_unit = d.mean(axis=1) if d.ndim == 2 else d
        if method == "t":
            low, high = _t_interval(per_unit, confidence)
        else:
            if d.ndim == 2:
                raise ValueError("method='bootstrap' takes 1-D pairs; for seeds × items use "
                                 "method='hierarchical'")
            if np.ptp(per_unit) == 0.0:
                low = high = float(per_unit.mean())
            else:
                with warnings.catch_warnings():  # BCa warns on tiny samples; it still answers
                    warnings.simplefilter("ignore")
                    res = _st.bootstrap((per_unit,), np.mean, confidence_level=confidence,
                                        n_resamples=n_resamples, rng=np.random.default_rng(seed))
                low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
    return Difference(mean=float(d.mean()), low=low, high=high, confidence=confidence,
                      n=int(x.shape[0]), lower_is_better=lower_is_better, design="paired",
                      method=method, differences=tuple(float(v) for v in per_unit))


def independent_difference(a: Sequence[float], b: Sequence[float],
                           lower_is_better: bool = True,
                           confidence: float = 0.95) -> Difference:
    """``mean(a) − mean(b)`` for arms that share nothing, with Welch's t-interval.

    Raises:
        ValueError: fewer than 2 values in an arm, NaN, 2-D input.
    """
    _check_confidence(confidence)
    x, y = _as_array(a, "a"), _as_array(b, "b")
    if x.ndim != 1 or y.ndim != 1:
        raise ValueError("independent_difference takes one value per run (1-D)")
    if len(x) < 2 or len(y) < 2:
        raise ValueError(f"each arm needs at least 2 runs, got {len(x)} and {len(y)}")
    mean = float(x.mean() - y.mean())
    if np.ptp(x) == 0.0 and np.ptp(y) == 0.0:
        low = high = mean
    else:
        ci = _st.ttest_ind(x, y, equal_var=False).confidence_interval(confidence)
        low, high = float(ci.low), float(ci.high)
    return Difference(mean=mean, low=low, high=high, confidence=confidence, n=len(x),
                      n_b=len(y), lower_is_better=lower_is_better, design="independent",
                      method="welch")


def proportion_interval(k: int, n: int, confidence: float = 0.95) -> Interval:
    """The accuracy ``k / n`` and its Wilson score interval (:func:`scipy.stats.binomtest`)."""
    _check_confidence(confidence)
    for name, v in (("k", k), ("n", n)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise TypeError(f"{name} must be an int (a count), got {v!r}")
    if n < 1 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n and n >= 1, got k={k}, n={n}")
    ci = _st.binomtest(int(k), int(n)).proportion_ci(confidence, method="wilson")
    return Interval(k / n, float(ci.low), float(ci.high), confidence)


def mean_interval(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """The mean of ``values`` (one per seed) and its t-interval."""
    _check_confidence(confidence)
    x = _as_array(values, "values")
    if x.ndim != 1 or len(x) < 2:
        raise ValueError(f"mean_interval needs at least 2 values in a 1-D sequence, got "
                         f"shape {x.shape}")
    low, high = _t_interval(x, confidence)
    return Interval(float(x.mean()), low, high, confidence)


def pareto_set(x: Sequence[float], y: Sequence[float]) -> list[int]:
    """Indices of the points that no other point dominates, both measures lower-is-better
    (a point dominates another when it is at least as low on both and lower on one)."""
    xs, ys = _as_array(x, "x"), _as_array(y, "y")
    if xs.shape != ys.shape or xs.ndim != 1:
        raise ValueError(f"x and y must be 1-D of one length, got {xs.shape} and {ys.shape}")
    keep = []
    for i in range(len(xs)):
        dominated = any(xs[j] <= xs[i] and ys[j] <= ys[i] and (xs[j] < xs[i] or ys[j] < ys[i])
                        for j in range(len(xs)))
        if not dominated:
            keep.append(i)
    return keep


# ------------------------------------------------------------------ the old seed-band rule
# Kept only until the last chapter moves to the paired rule; do not use in new code.

def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    if not values:
        raise ValueError("mean_sd needs at least one value")
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def separated(a: Sequence[float], b: Sequence[float]) -> bool:
    """Deprecated: True when the bands ``mean ± sd`` do not overlap (not a valid test)."""
    (ma, sa), (mb, sb) = mean_sd(a), mean_sd(b)
    return abs(ma - mb) > sa + sb


def compare(a: Sequence[float], b: Sequence[float], lower_is_better: bool = True) -> int:
    """Deprecated (the band rule): ``-1``/``1``/``0``. Use :func:`paired_difference`."""
    if not separated(a, b):
        return 0
    a_lower = mean_sd(a)[0] < mean_sd(b)[0]
    return -1 if a_lower == lower_is_better else 1
