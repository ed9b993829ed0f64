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

Train, validation and test sets are disjoint in the start date's **day of the year**: the
pair (month, day) decides the split (``(32·month + day) mod 5``: 0 test, 1 validation, 2–4
train), so no held-out question starts on a month-day that any training question starts on,
and no (month-day, k) question of the test set has a twin in training. Learning rates are
chosen on the validation split, scores reported on the test split.

Each question has a **kind** (:func:`question_kind`), by what the sum has to get right:
``"within_month"``, ``"month_end"`` (crosses into the next month), ``"year_end"`` (into the
next year) or ``"leap_day"`` (passes or lands on 29 February). Drawn naturally, almost all
questions stay within a month; the held-out sets are **stratified** (``strata=``) so that
every kind has enough questions to be scored on its own (:data:`TEST_STRATA`).
"""

from __future__ import annotations

import datetime
import random
import re
from dataclasses import dataclass

__all__ = [
    "answer_spans",
    "DATE_FORMATS",
    "KINDS",
    "TEST_STRATA",
    "VALIDATION_STRATA",
    "Example",
    "date_arithmetic",
    "format_date",
    "kind_of",
    "natural_kind_shares",
    "parse_worked_answer",
    "prompt_text",
    "question_kind",
]

MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December")
#: The four ways a start date is written, by name.
DATE_FORMATS = ("Month D, YYYY", "D Month YYYY", "M/D/YYYY", "D.M.YYYY")
_FIRST_DAY = datetime.date(2000, 1, 1)
_N_DAYS = (datetime.date(2029, 12, 31) - _FIRST_DAY).days
_SPLITS = ("train", "validation", "test")
#: What a question's sum has to get right, hardest last (see :func:`question_kind`).
KINDS = ("within_month", "month_end", "year_end", "leap_day")
#: The test set: 1,050 questions, every kind with enough questions to be scored on its own
#: (a Wilson interval of about ±5 points at 100 questions, ±2.5 at 400).
TEST_STRATA = {"within_month": 400, "month_end": 400, "year_end": 150, "leap_day": 100}
#: The validation set (learning rates are chosen on it): the same kinds, 200 questions.
VALIDATION_STRATA = {"within_month": 80, "month_end": 80, "year_end": 20, "leap_day": 20}


def _split_of(day: datetime.date) -> str:
    """The split of a start date, decided by its month and day only (not its year)."""
    return {0: "test", 1: "validation"}.get((32 * day.month + day.day) % 5, "train")


def question_kind(start: datetime.date, k: int) -> str:
    """What ``start + k days`` has to get right: ``"leap_day"`` if 29 February lies in
    ``start … start + k`` (a leap year's extra day, passed or landed on), else
    ``"year_end"`` if the sum enters the next year, ``"month_end"`` if it enters the next
    month, else ``"within_month"``."""
    end = start + datetime.timedelta(days=k)
    for year in {start.year, end.year}:
        leap = year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)
        if leap and start <= datetime.date(year, 2, 29) <= end:
            return "leap_day"
    if end.year != start.year:
        return "year_end"
    return "month_end" if end.month != start.month else "within_month"


def kind_of(example: Example) -> str:
    """The kind of a generated question (read back from its worked or bare answer)."""
    k = int(example.question.split()[3])
    spans = answer_spans(example.answer)["result"]
    result = datetime.date.fromisoformat(example.answer[slice(*spans)])
    return question_kind(result - datetime.timedelta(days=k), k)


def natural_kind_shares(max_offset: int = 10) -> dict[str, float]:
    """The share of each kind among all (start date, k) questions of 2000–2029, the
    distribution an unstratified draw follows (to re-weight a stratified score)."""
    counts = dict.fromkeys(KINDS, 0)
    for number in range(_N_DAYS):
        start = _FIRST_DAY + datetime.timedelta(days=number)
        for k in range(1, max_offset):
            counts[question_kind(start, k)] += 1
    total = sum(counts.values())
    return {kind: counts[kind] / total for kind in KINDS}


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


_WORK_FIRST = re.compile(r"(\S+) \+ (\d+) = (\S+)")
_RESULT_FIRST = re.compile(r"(\S+) = (\S+) \+ (\d+)")


def answer_spans(answer: str) -> dict[str, tuple[int, int]]:
    """Character spans of the start date and the result in ``answer``: a worked answer
    ``"S + k = R"``, its result-first twin ``"R = S + k"``, or a bare result (no start)."""
    if m := _WORK_FIRST.fullmatch(answer):
        return {"start": m.span(1), "result": m.span(3)}
    if m := _RESULT_FIRST.fullmatch(answer):
        return {"start": m.span(2), "result": m.span(1)}
    return {"start": (0, 0), "result": (0, len(answer))}


def parse_worked_answer(answer: str) -> tuple[str, str] | None:
    """``(start, result)`` of a worked answer ``"YYYY-MM-DD + k = YYYY-MM-DD"`` (or its
    result-first twin ``"R = S + k"``), or ``None`` if ``answer`` has neither form (so a
    model's answer can be scored step by step)."""
    if not (_WORK_FIRST.fullmatch(answer) or _RESULT_FIRST.fullmatch(answer)):
        return None
    spans = answer_spans(answer)
    return tuple(answer[slice(*spans[part])] for part in ("start", "result"))  # type: ignore[return-value]


def date_arithmetic(n: int | None = None, split: str = "train", seed: int = 0,
                    max_offset: int = 10, show_work: bool = True,
                    strata: dict[str, int] | None = None,
                    result_first: bool = False) -> list[Example]:
    """``n`` examples of "What date is k days after D?" with 1 ≤ k < ``max_offset``.

    Args:
        n: number of examples (≥ 1), drawn naturally; leave out when ``strata`` is given.
        split: ``"train"``, ``"validation"`` or ``"test"``; their start dates never coincide.
        seed: the same ``(n, split, seed)`` gives the same examples.
        max_offset: offsets are drawn from ``1 … max_offset - 1`` days.
        show_work: answers ``"<D in ISO> + k = <result>"`` (the default) instead of the
            bare ``"<result>"``.
        strata: ``{kind: count}`` (kinds of :data:`KINDS`): draw until each kind has its
            count, no question twice; the examples come grouped by kind, in the order given.
        result_first: with ``show_work``, write the result first: ``"<result> = <D> + k"``
            (the same tokens, in an order where the working cannot help the result).
    """
    if not isinstance(result_first, bool):
        raise TypeError(f"result_first must be True or False, got {result_first!r}")
    if result_first and not show_work:
        raise ValueError("result_first needs show_work=True (a bare answer has no working)")
    if strata is not None:
        if n is not None:
            raise ValueError("give either n (a natural draw) or strata (counts per kind), "
                             "not both")
        return _stratified(strata, split, seed, max_offset, show_work, result_first)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    if isinstance(max_offset, bool) or not isinstance(max_offset, int) or max_offset < 2:
        raise ValueError(f"max_offset must be an int >= 2, got {max_offset!r}")
    if not isinstance(show_work, bool):
        raise TypeError(f"show_work must be True or False, got {show_work!r}")
    rng = random.Random(f"date-arithmetic/{split}/{seed}")
    return [_example(*_draw(rng, split, max_offset), show_work, result_first)
            for _ in range(n)]


def _draw(rng: random.Random, split: str, max_offset: int) -> tuple[datetime.date, int, int]:
    """A start date of ``split``, an offset k and a writing style, drawn uniformly."""
    while True:
        start = _FIRST_DAY + datetime.timedelta(days=rng.randrange(_N_DAYS))
        if _split_of(start) == split:
            return start, rng.randrange(1, max_offset), rng.randrange(len(DATE_FORMATS))


def _example(start: datetime.date, k: int, style: int, show_work: bool,
             result_first: bool = False) -> Example:
    result = (start + datetime.timedelta(days=k)).isoformat()
    answer = f"{start.isoformat()} + {k} = {result}" if show_work else result
    if result_first:
        answer = f"{result} = {start.isoformat()} + {k}"
    days = "day" if k == 1 else "days"
    return Example(f"What date is {k} {days} after {format_date(start, style)}?", answer)


def _rare_candidates(kind: str, split: str, max_offset: int) -> list[tuple[datetime.date, int]]:
    """Every (start, k) of ``split`` whose question has ``kind`` (for the rare kinds, which
    rejection sampling would take long to fill)."""
    out = []
    for number in range(_N_DAYS):
        start = _FIRST_DAY + datetime.timedelta(days=number)
        if _split_of(start) != split or start.month not in (2, 12):
            continue
        out += [(start, k) for k in range(1, max_offset) if question_kind(start, k) == kind]
    return out


def _stratified(strata: dict[str, int], split: str, seed: int, max_offset: int,
                show_work: bool, result_first: bool) -> list[Example]:
    unknown = set(strata) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown kinds {sorted(unknown)}; choose from {KINDS}")
    if any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in strata.values()):
        raise ValueError(f"every count in strata must be a positive int, got {strata}")
    rng = random.Random(f"date-arithmetic/{split}/{seed}/strata")
    picked: dict[str, list[tuple[datetime.date, int, int]]] = {kind: [] for kind in strata}
    seen: set[tuple[datetime.date, int, int]] = set()
    for kind in ("year_end", "leap_day"):  # rare: draw from the full list of candidates
        if kind in strata:
            pool = [(s, k, style) for s, k in _rare_candidates(kind, split, max_offset)
                    for style in range(len(DATE_FORMATS))]
            if len(pool) < strata[kind]:
                raise ValueError(f"the {split} split has only {len(pool)} distinct "
                                 f"{kind} questions; ask for at most that many")
            picked[kind] = rng.sample(pool, strata[kind])
            seen.update(picked[kind])
    while any(len(picked[kind]) < strata[kind] for kind in ("within_month", "month_end")
              if kind in strata):
        start, k, style = _draw(rng, split, max_offset)
        kind = question_kind(start, k)
        if kind in ("within_month", "month_end") and kind in strata and \
                len(picked[kind]) < strata[kind] and (start, k, style) not in seen:
            seen.add((start, k, style))
            picked[kind].append((start, k, style))
    return [_example(*item, show_work, result_first) for kind in strata
            for item in picked[kind]]
