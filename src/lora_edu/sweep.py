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

__all__ = ["Sweep", "find_result", "decode_items"]

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
        path = find_result(name)
        return cls(json.loads(path.read_text()), path)

    # -------------------------------------------------------------- what was run, and how
    def provenance(self, width: int = 88) -> str:
        """Command, commit, date, machine and budget, as one wrapped paragraph."""
        d = self.data
        return textwrap.fill(
            f"computed by `{d['command']}` at commit {d['git_commit'][:12]} on "
            f"{d['date'][:10]}: {d['device']}, {d['cpu_count']} cores, torch {d['torch']}; "
            f"{d['steps']} steps of {d['batch_size']} examples per run, "
            f"{len(d['runs'])} runs, {d.get('seconds', float('nan')) / 3600:.1f} hours; "
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

    # ------------------------------------------------------------------- the numbers
    def metric(self, method: str, key: str, split: str = "test",
               implementation: str = "lora_edu") -> np.ndarray:
        """One value per report seed: a split summary (``"exact_match"``, ``"result_nll"``,
        ``"result_accuracy"``, ...) or a top-level figure (``"prose_loss"``, ``"chat_loss"``)."""
        runs = self.runs(method, implementation=implementation)
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
