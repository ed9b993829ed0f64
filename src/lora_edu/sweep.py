"""Reading chapter 8's committed sweep (``benchmarks/real_sweep.py``): runs, per-seed metrics
and per-question scores, arranged for paired comparisons.

The sweep file holds every run: the **selection** runs (selection seeds, every learning rate
of a method's grid, scored on the validation split) and the **report** runs (fresh seeds at
each method's chosen rate, scored on the test split question by question). Chapters 5, 8, 9
and 13 read it through :class:`Sweep`, so that "the runs of LoRA q,v r=8" means one thing
everywhere::

    sweep = Sweep.load()
    em = sweep.metric("lora_qv_r8", "exact_match")     # one value per report seed
    table = sweep.item_table("full", "exact")           # (seeds, questions) of 0/1
    d = paired_difference(sweep.metric("lora_qv_r8", "result_nll"),
                          sweep.metric("full", "result_nll"))
"""

from __future__ import annotations

import json
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["RobustDifference", "Sweep", "cluster_interval", "decode_items", "find_result",
           "load_result", "robust_difference"]

#: Where the committed results are, seen from the book's pages and from the repository root.
RESULT_DIRS = (Path("../benchmarks/results"), Path("benchmarks/results"))
_BITS = ("exact", "start_ok", "result_ok")


def find_result(name: str) -> Path:
    """The path of ``benchmarks/results/<name>`` seen from the working directory (a page in
    ``book/`` or the repository root)."""
    for folder in RESULT_DIRS:
        if (folder / name).exists():
            return folder / name
    raise FileNotFoundError(f"{name} is not in {[str(d) for d in RESULT_DIRS]}; run the "
                            f"benchmark that writes it, or start from the repository root")


def load_result(name: str) -> dict[str, Any]:
    """A committed result file as a dict, refused unless it comes from a clean commit.

    EVIDENCE.md §6: a committed result names the commit its code was at; ``+dirty`` means the
    code that made it is not in the history, so no chapter may read it.

    Raises:
        ValueError: the file was written from a tree with uncommitted changes.
    """
    path = find_result(name)
    data = json.loads(path.read_text())
    _check_clean(data, path)
    return data


def _check_clean(data: dict[str, Any], path: Path | None) -> None:
    commit = data.get("git_commit") or ""
    if not commit or "+dirty" in commit:
        raise ValueError(f"{path} was written at commit {commit!r}, not a clean commit: re-run "
                         f"its benchmark from a clean checkout and commit the result")


def decode_items(items: dict[str, Any]) -> dict[str, np.ndarray]:
    """Per-question scores as arrays: the 0/1 strings of hits become bool arrays."""
    out = {}
    for key, value in items.items():
        if key in _BITS:
            out[key] = np.frombuffer(value.encode(), dtype=np.uint8) == ord("1")
        else:
            out[key] = np.asarray(value, dtype=float)
    return out


@dataclass
class Sweep:
    """The committed result of ``benchmarks/real_sweep.py``."""

    data: dict[str, Any]
    path: Path | None = None

    @classmethod
    def load(cls, name: str = "real_sweep-cpu.json") -> Sweep:
        """Read a committed sweep (refused if it was written from a dirty tree)."""
        path = find_result(name)
        return cls(load_result(name), path)

    def at_runner_up(self, name: str = "runner_up-cpu.json") -> Sweep:
        """The report runs at each method's **runner-up** rate (``benchmarks/runner_up.py``),
        as a :class:`Sweep` whose ``best_lr`` is the runner-up rate and whose ``metric``,
        ``runs`` and ``item_table`` read those runs. Checked against this sweep: the same
        source sweep, seeds, budget and data, and each rate is this sweep's runner-up.

        Raises:
            ValueError: the runner-up file was made from another sweep or picked other rates.
        """
        other = Sweep.load(name)
        d = other.data
        if d.get("source_git_commit") != self.data["git_commit"] or \
                d.get("source_date") != self.data["date"]:
            raise ValueError(f"{other.path} was made from the sweep of "
                             f"{d.get('source_git_commit')} ({d.get('source_date')}), not from "
                             f"{self.path} ({self.data['git_commit']}, {self.data['date']}): "
                             f"re-run benchmarks/runner_up.py")
        for key in ("steps", "batch_size", "report_seeds"):
            if d[key] != self.data[key]:
                raise ValueError(f"{other.path}: {key}={d[key]!r} differs from the sweep's "
                                 f"{self.data[key]!r}")
        for m, lr in d["best_lr"].items():
            if lr != self.runner_up_lr(m):
                raise ValueError(f"{other.path}: {m} ran at {lr:g}, but the sweep's runner-up "
                                 f"is {self.runner_up_lr(m):g}")
        return other

    # -------------------------------------------------------------- what was run, and how
    def provenance(self, width: int = 88) -> str:
        """Command, commit, date, machine and budget, as one wrapped paragraph."""
        d = self.data
        return textwrap.fill(
            f"computed by `{d['command']}` at commit {d['git_commit'][:12]} on "
            f"{d['date'][:10]}: {d['device']}, {d['cpu_count']} cores, torch {d['torch']}; "
            f"{d['steps']} steps of {d['batch_size']} examples per run, "
            f"{len(d['runs'])} runs, " + (f"{d['seconds'] / 3600:.1f} hours" if "seconds" in d
                                          else "run time not recorded (stopped before its end)")
            + "; "
            f"selection seeds {d['selection_seeds']}, report seeds {d['report_seeds']}", width)

    @property
    def report_seeds(self) -> list[int]:
        return list(self.data["report_seeds"])

    @property
    def selection_seeds(self) -> list[int]:
        return list(self.data["selection_seeds"])

    @property
    def best_lr(self) -> dict[str, float]:
        return dict(self.data["best_lr"])

    @property
    def base(self) -> dict[str, Any]:
        return self.data["base"]

    @property
    def test_kinds(self) -> np.ndarray:
        return np.asarray(self.data["data"]["test_kinds"])

    def runs(self, method: str, phase: str = "report", implementation: str = "lora_edu",
             lr: float | None = None) -> list[dict[str, Any]]:
        """The runs of ``method`` in ``phase``, sorted by seed; report runs at the chosen
        learning rate, selection runs at ``lr`` (every rate if ``None``)."""
        out = [r for r in self.data["runs"] if r["method"] == method and r["phase"] == phase
               and r["implementation"] == implementation and (lr is None or r["lr"] == lr)]
        if not out:
            raise KeyError(f"no {phase} runs of {method!r} ({implementation}) at lr={lr}")
        return sorted(out, key=lambda r: (r["lr"], r["seed"]))

    def grid(self, method: str) -> list[float]:
        return sorted(self.data["grid"][method])

    def selection_curve(self, method: str, key: str = "result_nll") -> dict[float, list[float]]:
        """Validation ``key`` of every selection run, by learning rate (one value per seed)."""
        return {lr: [r["validation"][key] for r in self.runs(method, "selection", lr=lr)]
                for lr in self.grid(method)}

    def selection_ranking(self, method: str) -> list[tuple[float, float]]:
        """``(lr, mean validation result_nll over the selection seeds)`` for every rate of
        the grid (extensions included), best first: the ranking the sweep chose from.

        Raises:
            ValueError: a rate of the grid lacks a selection seed (the selection is
                incomplete), or the sweep's recorded choice is not the top of the ranking.
        """
        curve = self.selection_curve(method)
        n = len(self.selection_seeds)
        short = [lr for lr, vals in curve.items() if len(vals) != n]
        if short:
            raise ValueError(f"{method}: rates {short} have fewer than {n} selection runs; the "
                             f"selection is incomplete")
        ranking = sorted(((lr, float(np.mean(v))) for lr, v in curve.items()),
                         key=lambda t: t[1])
        chosen = self.data.get("best_lr", {}).get(method)
        if chosen is not None and chosen != ranking[0][0]:
            raise ValueError(f"{method}: the sweep chose {chosen:g}, but the lowest mean "
                             f"validation loss is at {ranking[0][0]:g}")
        return ranking

    def runner_up_lr(self, method: str) -> float:
        """The rate with the second-lowest mean validation result loss (selection seeds)."""
        ranking = self.selection_ranking(method)
        if len(ranking) < 2:
            raise ValueError(f"{method}: a grid of one rate has no runner-up")
        return ranking[1][0]

    def selection_gap(self, method: str):
        """The chosen rate against the runner-up: the paired difference (over the selection
        seeds) of their validation result loss. ``.winner is None`` means the two are
        within the selection noise (EVIDENCE.md §1: then report both)."""
        from lora_edu.stats import paired_difference

        (best, _), (second, _) = self.selection_ranking(method)[:2]
        curve = self.selection_curve(method)
        return paired_difference(curve[best], curve[second])

    # ------------------------------------------------------------------- the numbers
    #: per-question fields behind the split summaries, for :meth:`metric` over a subset
    ITEM_FIELDS = {"exact_match": "exact", "start_accuracy": "start_ok",
                   "result_accuracy": "result_ok", "result_nll": "result_nll"}

    def metric(self, method: str, key: str, split: str = "test",
               implementation: str = "lora_edu", kinds=None) -> np.ndarray:
        """One value per report seed: a split summary (``"exact_match"``, ``"result_nll"``,
        ``"result_accuracy"``, ...) or a top-level figure (``"prose_loss"``, ``"chat_loss"``).

        ``kinds`` (test split only): the mean of the per-question scores over the questions
        of those kinds (e.g. ``("within_month", "month_end")``) instead of all of them; a dict
        ``{kind: weight}`` gives the weighted mean of the per-kind means instead (e.g. the
        natural mix of questions, :func:`lora_edu.tasks.natural_kind_shares`).
        """
        runs = self.runs(method, implementation=implementation)
        if kinds is not None:
            if split != "test" or key not in self.ITEM_FIELDS:
                raise ValueError(f"kinds needs split='test' and a key in "
                                 f"{sorted(self.ITEM_FIELDS)}, got {split!r}, {key!r}")
            table = self.item_table(method, self.ITEM_FIELDS[key], split,
                                    implementation).astype(float)
            weights = dict(kinds) if isinstance(kinds, dict) else None
            groups = list(weights) if weights else [list(kinds)]
            means = []
            for group in groups:
                mask = np.isin(self.test_kinds, group if isinstance(group, list) else [group])
                if not mask.any():
                    raise ValueError(f"no test question is of the kinds {group}")
                means.append(table[:, mask].mean(axis=1))
            if weights is None:
                return means[0]
            w = np.array([weights[k] for k in groups], dtype=float)
            if (w < 0).any() or w.sum() <= 0:
                raise ValueError(f"kind weights must be non-negative and not all 0, got {weights}")
            return np.stack(means, axis=1) @ (w / w.sum())
        if key in runs[0].get(split, {}):
            return np.array([r[split][key] for r in runs])
        return np.array([r[key] for r in runs])

    def items(self, run: dict[str, Any], split: str = "test") -> dict[str, np.ndarray]:
        return decode_items(run[f"{split}_items"])

    def item_table(self, method: str, field: str, split: str = "test",
                   implementation: str = "lora_edu") -> np.ndarray:
        """``(seeds, questions)``: per-question ``field`` of each report seed."""
        return np.stack([self.items(r, split)[field]
                         for r in self.runs(method, implementation=implementation)])

    def base_items(self, split: str = "test") -> dict[str, np.ndarray]:
        return decode_items(self.base[f"{split}_items"])


@dataclass(frozen=True)
class RobustDifference:
    """A comparison of two methods made at every combination of their rates that the
    selection could not separate (the chosen rate, and the runner-up where the two were
    within the selection noise). The verdict is **robust** only when every combination names
    the same winner; otherwise no winner is named.

    Attributes:
        cases: ``(rate of a, rate of b, Difference)`` for each combination, the chosen pair
            first.
    """

    cases: tuple

    @property
    def chosen(self):
        """The difference at the two chosen rates."""
        return self.cases[0][2]

    @property
    def winner(self) -> str | None:
        """``"a"``/``"b"`` when every combination names it, else ``None``."""
        winners = {d.winner for _, _, d in self.cases}
        return winners.pop() if len(winners) == 1 else None

    @property
    def robust(self) -> bool:
        """Every combination gives the same verdict (a winner, or none)."""
        return len({d.winner for _, _, d in self.cases}) == 1

    def sentence(self, a: str, b: str, unit: str = "", digits: int = 3, scale: float = 1.0,
                 measure: str = "") -> str:
        """The verdict as a sentence. Robust: the chosen-rate sentence, then that the other
        combinations of near-tied rates give the same verdict (with the range of their
        differences). Not robust: it opens with "no robust winner", then gives every
        combination with its 95 % interval, so the opening never names a winner that the end
        takes back."""
        first = self.chosen.sentence(a, b, unit=unit, digits=digits, scale=scale,
                                     measure=measure)
        if len(self.cases) == 1:
            return first

        def num(v: float) -> str:
            return f"{v * scale:+.{digits}f}".replace("-", "\u2212")

        def case(ra, rb, d):
            said = "no winner" if d.winner is None else (a if d.winner == "a" else b) + " better"
            return (f"{a} at {ra:g}, {b} at {rb:g}: {said}, {num(d.mean)} "
                    f"[{num(d.low)}, {num(d.high)}]")

        u = f" {unit}" if unit else ""
        rest = self.cases[1:]
        if self.robust:
            lo, hi = min(d.mean for _, _, d in rest), max(d.mean for _, _, d in rest)
            spread = (f"difference {num(lo)}{u}" if num(lo) == num(hi) else
                      f"differences {num(lo)} to {num(hi)}{u}")
            return (f"{first} (chosen rates); the same verdict at the {len(rest)} other "
                    f"combination{'s' if len(rest) > 1 else ''} of near-tied rates ({spread})")
        on = f" {measure}" if measure else ""
        return (f"no robust winner between {a} and {b}{on}: **the verdict changes with the "
                f"learning rate**, so none is named ({u.strip() or 'differences'}, 95 % CI: "
                + "; ".join(case(*c) for c in self.cases) + "; the first pair is the chosen "
                "rates)")


def robust_difference(sweep: Sweep, runner_up: Sweep | None, a: str, b: str, key: str,
                      lower_is_better: bool = True, split: str = "test",
                      transform=None, kinds=None) -> RobustDifference:
    """:func:`lora_edu.stats.paired_difference` of ``a − b`` on ``key`` (report seeds), at
    the chosen rates and, for each method whose runner-up rate was within the selection noise
    (:meth:`Sweep.selection_gap`), at the runner-up too: every combination, paired by seed.

    ``runner_up`` is :meth:`Sweep.at_runner_up` (``None``: the chosen rates only).
    ``transform`` (e.g. a difference from the base model) is applied to each metric array;
    ``kinds`` restricts the test questions (:meth:`Sweep.metric`).
    """
    from lora_edu.stats import paired_difference

    def values(s: Sweep, m: str):
        v = s.metric(m, key, split, kinds=kinds)
        return transform(v) if transform else v

    def options(m: str):
        out = [(sweep.best_lr[m], sweep)]
        if runner_up is not None and m in runner_up.best_lr and \
                sweep.selection_gap(m).winner is None:
            out.append((runner_up.best_lr[m], runner_up))
        return out

    cases = []
    for (ra, sa), (rb, sb) in ((x, y) for x in options(a) for y in options(b)):
        if sa.report_seeds != sb.report_seeds:
            raise ValueError("the two sets of report runs have different seeds: not paired")
        cases.append((ra, rb, paired_difference(values(sa, a), values(sb, b),
                                                lower_is_better=lower_is_better)))
    return RobustDifference(tuple(cases))


def cluster_interval(table: np.ndarray, clusters, confidence: float = 0.95,
                     n_resamples: int = 2000, seed: int = 0):
    """The mean of a ``(seeds, items)`` table with a percentile bootstrap interval that
    resamples seeds and, independently, whole **clusters** of items (``clusters[j]`` names
    item j's cluster, e.g. its start day of the year): questions that share a start day are
    not independent evidence, so the interval is as wide as the number of clusters allows.

    Returns:
        :class:`lora_edu.stats.Interval`.

    Raises:
        ValueError: the table is not 2-D or ``clusters`` does not label every item.
    """
    from lora_edu.stats import Interval

    t = np.asarray(table, dtype=float)
    labels = np.asarray(clusters)
    if t.ndim != 2 or labels.shape != (t.shape[1],):
        raise ValueError(f"need a (seeds, items) table and one cluster label per item, got "
                         f"{t.shape} and {labels.shape}")
    ids, inverse = np.unique(labels, return_inverse=True)
    # per seed and cluster: the sum of the item scores and the count of items
    sums = np.zeros((t.shape[0], len(ids)))
    np.add.at(sums.T, inverse, t.T)
    counts = np.bincount(inverse, minlength=len(ids)).astype(float)
    rng = np.random.default_rng(seed)
    means = np.empty(n_resamples)
    for i in range(n_resamples):
        rows = rng.integers(0, t.shape[0], t.shape[0])
        cols = rng.integers(0, len(ids), len(ids))
        means[i] = sums[np.ix_(rows, cols)].sum() / (len(rows) * counts[cols].sum())
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return Interval(float(t.mean()), float(low), float(high), confidence)
