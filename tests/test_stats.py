"""Seed bands (lora_edu.stats) and the offline task (lora_edu.tasks)."""

from __future__ import annotations

import datetime

import pytest

from lora_edu.stats import compare, mean_sd, separated
from lora_edu.tasks import date_arithmetic, parse_worked_answer


def test_mean_sd_is_the_sample_standard_deviation():
    assert mean_sd([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_sd([5.0]) == (5.0, 0.0)
    with pytest.raises(ValueError):
        mean_sd([])


def test_a_winner_only_outside_the_bands():
    assert not separated([1.0, 2.0, 3.0], [2.5, 3.5, 4.5])  # bands overlap
    assert separated([1.0, 1.1, 1.2], [2.0, 2.1, 2.2])
    assert compare([1.0, 1.1, 1.2], [2.0, 2.1, 2.2]) == -1  # lower loss wins
    assert compare([1.0, 1.1, 1.2], [2.0, 2.1, 2.2], lower_is_better=False) == 1
    assert compare([1.0, 2.0, 3.0], [2.5, 3.5, 4.5]) == 0


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
