"""lora_edu.stats: paired and independent differences, intervals, verdicts; and the task."""

from __future__ import annotations

import datetime

import numpy as np
import pytest
from scipy import stats as st

from lora_edu.stats import (independent_difference, mean_interval, paired_difference,
                            pareto_set, proportion_interval)
from lora_edu.tasks import date_arithmetic, parse_worked_answer


def test_paired_difference_matches_scipys_one_sample_t_interval():
    a, b = [0.031, 0.027, 0.035, 0.029], [0.026, 0.027, 0.030, 0.028]
    d = paired_difference(a, b)
    ref = st.ttest_rel(a, b).confidence_interval(0.95)
    assert d.mean == pytest.approx(np.mean(np.subtract(a, b)))
    assert (d.low, d.high) == pytest.approx((ref.low, ref.high))
    assert d.n == 4 and d.design == "paired"


def test_worse_on_every_seed_is_a_loss_even_when_the_bands_overlap():
    # the case from the evidence issue: per-seed differences +0.0057, +0.0094, +0.0131
    b = np.array([0.0300, 0.0250, 0.0350])
    a = b + [0.0057, 0.0094, 0.0131]
    bands_overlap = abs(a.mean() - b.mean()) < a.std(ddof=1) + b.std(ddof=1)
    assert bands_overlap  # the old rule called this a tie
    d = paired_difference(a, b, lower_is_better=True)
    assert d.winner == "b" and d.low > 0
    assert "beats" in d.sentence("merged NF4", "bf16 merge", unit="nats")
    assert d.sentence("x", "y").startswith("y beats x")


def test_no_winner_when_the_interval_contains_zero():
    d = paired_difference([1.0, 2.0, 3.0], [1.5, 1.5, 3.2])
    assert d.low < 0 < d.high and d.winner is None
    assert "indistinguishable at this budget" in d.sentence("A", "B")


def test_higher_is_better_flips_the_winner():
    acc_a, acc_b = [0.80, 0.82, 0.81], [0.70, 0.71, 0.73]
    assert paired_difference(acc_a, acc_b, lower_is_better=False).winner == "a"
    assert paired_difference(acc_a, acc_b, lower_is_better=True).winner == "b"


def test_identical_differences_give_a_point_interval():
    d = paired_difference([1.0, 2.0, 3.0], [0.5, 1.5, 2.5])
    assert d.low == d.high == pytest.approx(0.5) and d.winner == "b"


def test_bootstrap_over_pairs_and_over_seeds_and_items():
    rng = np.random.default_rng(0)
    b = rng.normal(size=40)
    a = b + 0.5 + rng.normal(scale=0.1, size=40)
    boot = paired_difference(a, b, method="bootstrap")
    t = paired_difference(a, b)
    assert boot.low == pytest.approx(t.low, abs=0.03) and boot.high == pytest.approx(t.high, abs=0.03)
    table_a = (rng.random((3, 500)) < 0.8).astype(float)
    table_b = (rng.random((3, 500)) < 0.6).astype(float)
    h = paired_difference(table_a, table_b, lower_is_better=False, method="hierarchical",
                          n_resamples=2000)
    assert h.low < 0.2 < h.high and h.winner == "a"
    assert h.mean == pytest.approx((table_a - table_b).mean())


def test_independent_difference_is_welchs_interval():
    a, b = [1.0, 1.2, 0.9, 1.1], [1.5, 1.9, 1.7]
    d = independent_difference(a, b)
    ref = st.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert (d.low, d.high) == pytest.approx((ref.low, ref.high))
    assert d.winner == "a" and d.design == "independent"


def test_proportion_interval_is_wilsons():
    iv = proportion_interval(41, 64)
    # Wilson by hand: (p + z²/2n ± z√(p(1−p)/n + z²/4n²)) / (1 + z²/n)
    z, n, p = st.norm.ppf(0.975), 64, 41 / 64
    centre, half = p + z * z / (2 * n), z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert iv.low == pytest.approx((centre - half) / (1 + z * z / n), rel=1e-6)
    assert iv.high == pytest.approx((centre + half) / (1 + z * z / n), rel=1e-6)
    assert proportion_interval(0, 16).low == 0.0
    assert "95 % CI" in iv.text(scale=100, digits=1)


def test_mean_interval_and_pareto_set():
    iv = mean_interval([1.0, 2.0, 3.0])
    ref = st.t.interval(0.95, 2, loc=2.0, scale=st.sem([1.0, 2.0, 3.0]))
    assert (iv.low, iv.high) == pytest.approx(ref)
    # (1,3) (2,2) (3,1) are the front; (3,3) and (2,2.5) are dominated
    assert pareto_set([1, 2, 3, 3, 2], [3, 2, 1, 3, 2.5]) == [0, 1, 2]


@pytest.mark.parametrize("call, error, match", [
    (lambda: paired_difference([1, 2, 3], [1, 2]), ValueError, "same shape"),
    (lambda: paired_difference([1.0], [2.0]), ValueError, "at least 2 pairs"),
    (lambda: paired_difference([1, float("nan")], [1, 2]), ValueError, "NaN"),
    (lambda: paired_difference([1, 2], [1, 2], method="z"), ValueError, "method"),
    (lambda: paired_difference([1, 2], [1, 2], confidence=95), ValueError, "confidence"),
    (lambda: paired_difference("ab", "cd"), TypeError, "string"),
    (lambda: paired_difference([[1, 2]] * 2, [[1, 2]] * 2, method="bootstrap"), ValueError,
     "hierarchical"),
    (lambda: independent_difference([1], [1, 2]), ValueError, "at least 2 runs"),
    (lambda: proportion_interval(5, 4), ValueError, "k <= n"),
    (lambda: proportion_interval(2.0, 4), TypeError, "int"),
    (lambda: mean_interval([1.0]), ValueError, "at least 2"),
])
def test_bad_input_gets_a_clear_error(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_date_arithmetic_answers_are_right_and_the_splits_disjoint():
    splits = {s: date_arithmetic(300, s) for s in ("train", "validation", "test")}
    starts = {}
    for split, examples in splits.items():
        assert examples == date_arithmetic(300, split)  # seeded
        for ex in examples:
            k = int(ex.question.split()[3])
            written, result = parse_worked_answer(ex.answer)
            start = datetime.date.fromisoformat(result) - datetime.timedelta(days=k)
            assert written == start.isoformat() and ex.answer.startswith(f"{written} + {k} = ")
            starts.setdefault(split, set()).add(start)
            assert 1 <= k < 10
    bare = date_arithmetic(300, "test", show_work=False)
    assert [b.answer for b in bare] == [parse_worked_answer(e.answer)[1] for e in splits["test"]]
    assert parse_worked_answer("2021-03-05") is None
    assert not starts["train"] & starts["test"] and not starts["train"] & starts["validation"]
    assert not starts["validation"] & starts["test"]


def test_date_arithmetic_refuses_bad_input():
    with pytest.raises(ValueError, match="split"):
        date_arithmetic(3, "dev")
    with pytest.raises(ValueError, match="positive"):
        date_arithmetic(0)
    with pytest.raises(ValueError, match="max_offset"):
        date_arithmetic(3, max_offset=1)
    with pytest.raises(TypeError, match="show_work"):
        date_arithmetic(3, show_work="yes")
