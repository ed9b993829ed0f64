"""Tasks for fine-tuning the real model, generated offline from a seed and scored exactly.

**Date arithmetic** (:func:`date_arithmetic`): "What date is 7 days after 26.2.2021?" →
``2021-02-26 + 7 = 2021-03-05``. The answer needs two skills: read a date written in one of
four formats and write it in ISO 8601, then add a number of days across month and year
boundaries (month lengths, leap years). The answer *shows its work* (a scratchpad, Nye et al.
2021): the normalised start date first, then the sum. Without it a 135 M model must do both
steps in the few tokens of the result, and it learns far more slowly (``show_work=False``
gives that version, for comparison). SmolLM2-135M answers none of it exactly out of the box;
fine-tuning learns the form at once, the normalisation soon and the arithmetic last, so
methods and ranks separate. The examples come from :mod:`datetime`, so every answer is right
by construction; exact match compares the whole answer line.

Train, validation and test sets are disjoint: a start date's day number modulo 5 decides its
split (0: test, 1: validation, 2–4: train), so no held-out question shares its start date
with a training one. Learning rates are chosen on the validation split, scores reported on
the test split.
"""

from __future__ import annotations

import datetime
import random
from dataclasses import dataclass

__all__ = ["Example", "DATE_FORMATS", "date_arithmetic", "format_date", "prompt_text",
           "parse_worked_answer"]

MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December")
#: The four ways a start date is written, by name.
DATE_FORMATS = ("Month D, YYYY", "D Month YYYY", "M/D/YYYY", "D.M.YYYY")
_FIRST_DAY = datetime.date(2000, 1, 1)
_N_DAYS = (datetime.date(2029, 12, 31) - _FIRST_DAY).days
_SPLITS = ("train", "validation", "test")


def _split_of(day_number: int) -> str:
    return {0: "test", 1: "validation"}.get(day_number % 5, "train")


@dataclass(frozen=True)
class Example:
    """One question and its exact answer."""

    question: str
    answer: str


def format_date(day: datetime.date, style: int) -> str:
    """``day`` written in ``DATE_FORMATS[style]``."""
    month = MONTHS[day.month - 1]
    return (f"{month} {day.day}, {day.year}", f"{day.day} {month} {day.year}",
            f"{day.month}/{day.day}/{day.year}", f"{day.day}.{day.month}.{day.year}")[style]


def prompt_text(question: str) -> str:
    """The plain prompt the model sees (no chat template: shorter sequences, faster steps)."""
    return f"Question: {question}\nAnswer:"


def parse_worked_answer(answer: str) -> tuple[str, str] | None:
    """``(start, result)`` of a worked answer ``"YYYY-MM-DD + k = YYYY-MM-DD"``, or ``None``
    if ``answer`` does not have that form (so a model's answer can be scored step by step)."""
    parts = answer.split(" = ")
    if len(parts) != 2 or " + " not in parts[0]:
        return None
    return parts[0].split(" + ")[0].strip(), parts[1].strip()


def date_arithmetic(n: int, split: str = "train", seed: int = 0, max_offset: int = 10,
                    show_work: bool = True) -> list[Example]:
    """``n`` examples of "What date is k days after D?" with 1 ≤ k < ``max_offset``.

    Args:
        n: number of examples (≥ 1).
        split: ``"train"``, ``"validation"`` or ``"test"``; their start dates never coincide.
        seed: the same ``(n, split, seed)`` gives the same examples.
        max_offset: offsets are drawn from ``1 … max_offset - 1`` days.
        show_work: answers ``"<D in ISO> + k = <result>"`` (the default) instead of the
            bare ``"<result>"``.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    if isinstance(max_offset, bool) or not isinstance(max_offset, int) or max_offset < 2:
        raise ValueError(f"max_offset must be an int >= 2, got {max_offset!r}")
    if not isinstance(show_work, bool):
        raise TypeError(f"show_work must be True or False, got {show_work!r}")
    rng = random.Random(f"date-arithmetic/{split}/{seed}")
    examples = []
    while len(examples) < n:
        number = rng.randrange(_N_DAYS)
        if _split_of(number) != split:
            continue
        start = _FIRST_DAY + datetime.timedelta(days=number)
        k = rng.randrange(1, max_offset)
        written = format_date(start, rng.randrange(len(DATE_FORMATS)))
        result = (start + datetime.timedelta(days=k)).isoformat()
        answer = f"{start.isoformat()} + {k} = {result}" if show_work else result
        examples.append(Example(f"What date is {k} days after {written}?", answer))
    return examples
