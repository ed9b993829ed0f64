"""The classifier chapter's learning rate, chosen on validation, and its result on fresh seeds.

Chapter 15 trains SmolLM2-135M-Instruct as a sequence classifier (LoRA on W_q, W_v at r = 8
and the new head trained in full, :data:`lora_edu.classifier.RECIPE`) on the offline category
task of :mod:`lora_edu.classifier`. This script does what the chapter cannot afford to do live:

1. **Selection**: every learning rate of the grid with the selection seeds; the best by mean
   validation loss (a continuous score: 48 validation sentences give accuracies in steps of
   about 2 points, too coarse to choose with). A best at an edge of the grid extends the grid.
2. **Report**: the chosen rate with fresh seeds that took no part in the choice, scored on the
   test split (accuracy before and after training, and which sentences were right).

Both steps run twice, with the same protocol, seeds and training length: for LoRA plus the
trained head (the chapter's recipe) and for the head alone on the frozen body (a linear probe,
``--head-grid``), the baseline that says whether LoRA is needed. At one seed both start from
the same head, so their test results pair by seed and sentence.

The chapter re-runs the first fresh seed of LoRA live and checks it against this file.

Writes ``benchmarks/results/classifier-<device>.json``. About 12 minutes on one CPU core.

    python benchmarks/classifier.py
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _provenance import provenance, write_result  # noqa: E402

from lora_edu.classifier import RECIPE, load_classifier, run  # noqa: E402
from lora_edu.repro import get_device  # noqa: E402

GRID = [3e-4, 1e-3, 3e-3, 1e-2]
HEAD_GRID = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2]
SELECTION_SEEDS = [0, 1]
REPORT_SEEDS = [2, 3, 4]
MAX_EXTENSIONS = 2


def summary(record: dict) -> dict:
    """What the JSON keeps of a run (no model)."""
    return {split: {"before": {k: record["before"][split][k] for k in ("loss", "accuracy",
                                                                       "correct")},
                    "after": {k: record["after"][split][k] for k in ("loss", "accuracy",
                                                                     "correct")}}
            for split in ("validation", "test")} | {"losses": record["losses"]}


def choose_and_report(base, tokenizer, recipe: dict, grid: list[float],
                      selection_seeds: list[int], report_seeds: list[int]) -> dict:
    """Selection on validation (extending the grid past a best at its edge), then the chosen
    rate on fresh seeds, scored on test."""
    name = recipe["method"]

    def val_loss(lr: float) -> list[float]:
        out = []
        for seed in selection_seeds:
            rec = run(base, tokenizer, lr, seed, recipe)
            out.append(rec["after"]["validation"]["loss"])
            print(f"{name} lr {lr:g} seed {seed}: validation loss {out[-1]:.4f}, accuracy "
                  f"{rec['after']['validation']['accuracy']:.3f}", flush=True)
        return out

    selection = {lr: val_loss(lr) for lr in sorted(grid)}
    for _ in range(MAX_EXTENSIONS):  # a best at an edge extends the grid past it
        mean = {lr: sum(v) / len(v) for lr, v in selection.items()}
        best = min(mean, key=mean.get)
        lrs = sorted(selection)
        if best == lrs[0]:
            new = best / 3
        elif best == lrs[-1]:
            new = best * 3
        else:
            break
        selection[new] = val_loss(new)
    mean = {lr: sum(v) / len(v) for lr, v in selection.items()}
    best = min(mean, key=mean.get)
    report = {seed: summary(run(base, tokenizer, best, seed, recipe)) for seed in report_seeds}
    for seed, rec in report.items():
        print(f"{name} report seed {seed}: test accuracy "
              f"{rec['test']['before']['accuracy']:.3f} → {rec['test']['after']['accuracy']:.3f}",
              flush=True)
    return {"selection": {f"{lr:g}": losses for lr, losses in sorted(selection.items())},
            "best_lr": best, "report": {str(s): r for s, r in report.items()}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=RECIPE["steps"])
    parser.add_argument("--grid", type=float, nargs="+", default=GRID)
    parser.add_argument("--head-grid", type=float, nargs="+", default=HEAD_GRID)
    parser.add_argument("--selection-seeds", type=int, nargs="+", default=SELECTION_SEEDS)
    parser.add_argument("--report-seeds", type=int, nargs="+", default=REPORT_SEEDS)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = get_device()
    base, tokenizer = load_classifier()
    base.to(device)
    recipe = {**RECIPE, "steps": args.steps}
    started = time.perf_counter()
    lora = choose_and_report(base, tokenizer, recipe, args.grid, args.selection_seeds,
                             args.report_seeds)
    head = choose_and_report(base, tokenizer, {**recipe, "method": "head"}, args.head_grid,
                             args.selection_seeds, args.report_seeds)
    result = {**provenance("classifier", device), "recipe": recipe,
              "selection_seeds": args.selection_seeds, "report_seeds": args.report_seeds,
              **lora, "selection_criterion": "mean validation loss after training",
              "head_only": {"recipe": {**recipe, "method": "head"}, **head},
              "seconds": round(time.perf_counter() - started, 1)}
    write_result(result, "classifier", device, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
