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

``--supplement`` reads that file and adds what its verdicts need, in
``benchmarks/results/classifier_supplement-<device>.json`` (about 4 minutes on one core):

3. **A converged linear probe**: multinomial logistic regression (no bias, the head's form) on
   the frozen body's last-token features of all training sentences, fitted to convergence by
   full-batch L-BFGS in float64, its L2 strength chosen on validation loss (a best at an edge
   extends the grid), scored on the test sentences. It is deterministic given the features:
   one probe, against LoRA's fresh seeds.
4. **LoRA at the alternative rates**: every rate that a selection seed ranked first other than
   the chosen one, and the runner-up by mean validation loss, run with the fresh seeds on test,
   so that the verdicts can be checked at a rate the selection could have picked.

    python benchmarks/classifier.py --supplement
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _provenance import RESULTS, provenance, write_result  # noqa: E402

from lora_edu.classifier import RECIPE, category_examples, load_classifier, run  # noqa: E402
from lora_edu.repro import get_device  # noqa: E402

GRID = [3e-4, 1e-3, 3e-3, 1e-2]
HEAD_GRID = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2]
SELECTION_SEEDS = [0, 1]
REPORT_SEEDS = [2, 3, 4]
MAX_EXTENSIONS = 2
#: L2 strengths of the converged probe (on the mean cross-entropy: + λ/2 ‖W‖²)
PROBE_GRID = [1e-3, 1e-2, 1e-1, 1.0]
PROBE_MAX_EXTENSIONS = 4


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


def alternative_rates(selection: dict[str, list[float]], best: float) -> list[float]:
    """The rates the verdicts are re-checked at: each selection seed's own best (when not the
    chosen rate) and the runner-up by mean validation loss, in increasing order."""
    rates = {float(lr): losses for lr, losses in selection.items()}
    mean = {lr: sum(v) / len(v) for lr, v in rates.items()}
    runner_up = min((lr for lr in mean if lr != best), key=mean.get)
    per_seed = {min(rates, key=lambda lr, i=i: rates[lr][i])
                for i in range(len(next(iter(rates.values()))))}
    return sorted((per_seed | {runner_up}) - {best})


@torch.no_grad()
def last_token_features(base: nn.Module, tokenizer, texts: list[str],
                        batch_size: int = 64) -> torch.Tensor:
    """What the head reads: the frozen body's hidden state at each text's last token, (n, 576).

    The head is swapped for the identity on a copy, so transformers' own pooling (the last
    non-padding token) picks the row, exactly as it does for the head.
    """
    import copy

    from lora_edu.classifier import encode
    model = copy.deepcopy(base).eval()
    model.score = nn.Identity()
    device = next(model.parameters()).device
    out = [model(**encode(tokenizer, texts[i:i + batch_size], device)).logits.float().cpu()
           for i in range(0, len(texts), batch_size)]
    return torch.cat(out)


def fit_probe(x: torch.Tensor, y: torch.Tensor, l2: float, classes: int,
              max_rounds: int = 50) -> tuple[torch.Tensor, dict]:
    """Multinomial logistic regression without bias, to convergence, in float64.

    Minimises mean cross-entropy(x Wᵀ, y) + (l2 / 2) ‖W‖², W of shape (classes, d), by
    full-batch L-BFGS (strong Wolfe line search) from W = 0; the objective is strictly convex
    for l2 > 0, so the minimum is unique. Returns W and {"grad_max": the largest absolute
    gradient entry at the end, "iterations": L-BFGS iterations, "objective": its value}.
    """
    x, y = x.double(), y.long()
    w = torch.zeros(classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=1, max_iter=500, history_size=50, tolerance_grad=1e-10,
                            tolerance_change=1e-16, line_search_fn="strong_wolfe")

    def objective():
        return F.cross_entropy(x @ w.T, y) + 0.5 * l2 * (w * w).sum()

    def closure():
        opt.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    for _ in range(max_rounds):
        opt.step(closure)
        grad = torch.autograd.grad(objective(), w)[0]
        if grad.abs().max() < 1e-9:
            break
    grad = torch.autograd.grad(objective(), w)[0]
    return w.detach(), {"grad_max": float(grad.abs().max()),
                        "iterations": int(opt.state[opt._params[0]]["n_iter"]),
                        "objective": float(objective().detach())}


def converged_probe(base: nn.Module, tokenizer, grid: list[float]) -> dict:
    """The converged linear probe: L2 strength chosen on validation loss, scored on test."""
    from lora_edu.classifier import CATEGORIES
    data = {split: category_examples(split, per_noun=None if split == "train" else 1)
            for split in ("train", "validation", "test")}
    feats = {s: last_token_features(base, tokenizer, [t for t, _ in ex])
             for s, ex in data.items()}
    labels = {s: torch.tensor([y for _, y in ex]) for s, ex in data.items()}

    def score(w: torch.Tensor, split: str) -> dict:
        logits = feats[split].double() @ w.T
        correct = (logits.argmax(-1) == labels[split]).int().tolist()
        return {"loss": float(F.cross_entropy(logits, labels[split])),
                "accuracy": sum(correct) / len(correct), "correct": correct}

    fits = {}

    def fit(l2: float) -> None:
        w, info = fit_probe(feats["train"], labels["train"], l2, len(CATEGORIES))
        fits[l2] = (w, info | {"train": score(w, "train"), "validation": score(w, "validation")})
        print(f"probe l2 {l2:g}: validation loss {fits[l2][1]['validation']['loss']:.4f}, "
              f"accuracy {fits[l2][1]['validation']['accuracy']:.3f}, "
              f"grad {info['grad_max']:.1e}", flush=True)

    for l2 in sorted(grid):
        fit(l2)
    for _ in range(PROBE_MAX_EXTENSIONS):  # a best at an edge extends the grid past it
        best = min(fits, key=lambda v: fits[v][1]["validation"]["loss"])
        lo, hi = min(fits), max(fits)
        if best not in (lo, hi):
            break
        fit(best / 10 if best == lo else best * 10)
    best = min(fits, key=lambda v: fits[v][1]["validation"]["loss"])
    w = fits[best][0]
    return {"objective": "mean cross-entropy + l2/2 ||W||^2, no bias, L-BFGS float64 from 0",
            "train_sentences": len(data["train"]),
            "selection": {f"{v:g}": {k: info[k] for k in ("grad_max", "iterations")}
                          | {s: {m: info[s][m] for m in ("loss", "accuracy")}
                             for s in ("train", "validation")}
                          for v, (_, info) in sorted(fits.items())},
            "best_l2": best, "grad_max": fits[best][1]["grad_max"],
            "test": score(w, "test"), "weight": w.float().tolist()}


def supplement(base: nn.Module, tokenizer, main_result: dict) -> dict:
    """The converged probe and LoRA at the alternative rates on the fresh seeds."""
    recipe, seeds = main_result["recipe"], main_result["report_seeds"]
    probe = converged_probe(base, tokenizer, PROBE_GRID)
    rates = alternative_rates(main_result["selection"], main_result["best_lr"])
    alternatives = {}
    for lr in rates:
        alternatives[f"{lr:g}"] = {str(s): summary(run(base, tokenizer, lr, s, recipe))
                                   for s in seeds}
        print(f"lora lr {lr:g}: test right "
              f"{[sum(r['test']['after']['correct']) for r in alternatives[f'{lr:g}'].values()]}",
              flush=True)
    return {"main_result": {k: main_result[k] for k in ("git_commit", "date")},
            "report_seeds": seeds, "converged_probe": probe,
            "lora_alternatives": alternatives}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=RECIPE["steps"])
    parser.add_argument("--grid", type=float, nargs="+", default=GRID)
    parser.add_argument("--head-grid", type=float, nargs="+", default=HEAD_GRID)
    parser.add_argument("--selection-seeds", type=int, nargs="+", default=SELECTION_SEEDS)
    parser.add_argument("--report-seeds", type=int, nargs="+", default=REPORT_SEEDS)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--supplement", action="store_true",
                        help="add the converged probe and LoRA at the alternative rates, "
                             "reading the committed classifier-<device>.json")
    args = parser.parse_args()
    device = get_device()
    base, tokenizer = load_classifier()
    base.to(device)
    if args.supplement:
        main_result = json.loads((RESULTS / f"classifier-{device.type}.json").read_text())
        started = time.perf_counter()
        result = {**provenance("classifier_supplement", device),
                  **supplement(base, tokenizer, main_result),
                  "seconds": round(time.perf_counter() - started, 1)}
        write_result(result, "classifier_supplement", device, args.out)
        return 0
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
