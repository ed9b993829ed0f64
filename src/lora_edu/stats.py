"""Seed bands: when does a difference between two methods count?

A run's result depends on its seed (the initialisation of A, the order of the batches). A
method is summarised by the mean and the sample standard deviation over seeds, and the book
names a winner only when the two bands ``mean ± sd`` do not overlap. This is a conservative
rule for three seeds, not a significance test; it is the one the chapters use throughout so
that a sentence such as "LoRA r = 64 beats r = 1" is decided by the same code everywhere.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

__all__ = ["mean_sd", "separated", "compare"]


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    if not values:
        raise ValueError("mean_sd needs at least one value")
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def separated(a: Sequence[float], b: Sequence[float]) -> bool:
    """True when the bands ``mean ± sd`` of ``a`` and ``b`` do not overlap."""
    (ma, sa), (mb, sb) = mean_sd(a), mean_sd(b)
    return abs(ma - mb) > sa + sb


def compare(a: Sequence[float], b: Sequence[float], lower_is_better: bool = True) -> int:
    """``-1`` if ``a`` is better than ``b`` outside the seed bands, ``1`` if worse, ``0`` if
    the bands overlap (no winner)."""
    if not separated(a, b):
        return 0
    a_lower = mean_sd(a)[0] < mean_sd(b)[0]
    return -1 if a_lower == lower_is_better else 1
