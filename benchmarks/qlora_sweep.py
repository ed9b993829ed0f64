"""Chapter 13's QLoRA sweep on the toy GPT: every training run behind the chapter's verdicts.

Usage:
    python benchmarks/qlora_sweep.py                     # what was committed (~130 runs)
    python benchmarks/qlora_sweep.py --report-seeds 2 --selection-seeds 1 --out /tmp/q.json

The toy GPT (``gpt-cpu``, pretrained on Python's standard library) is adapted to Python's
documentation with LoRA r = 8, α = 16, trained 30 AdamW steps of 8 windows, on the CPU in
fp32 (one thread, so that a re-run gives the same numbers). Five configurations (``KINDS``):
LoRA on every linear layer of the blocks on the fp32 base and on the same base in NF4 (double
quantisation), LoRA on W_q and W_v only on both bases (with the rank that gives as many
trainable parameters), and QLoRA started with LoftQ (5 alternations).

The design follows ``EVIDENCE.md``:

* **selection**: each configuration's peak learning rate is chosen on the *tuning windows*
  (held-out target text halfway between the reported windows, sharing no byte with them),
  averaged over the *selection seeds*, on a grid a factor 3 apart around the recipe's
  3e-3; a best at the grid's edge extends the grid (at most twice);
* **report**: every configuration is then trained at its chosen rate with *fresh* seeds (the
  report seeds, none of them a selection seed) and scored on the reported windows. A seed
  sets A's initialisation and the batch order, so two configurations with one seed are a
  pair.

For each report seed the file also holds what the chapter's other verdicts need: the three
merges of the QLoRA model (into the original W0, into Ŵ0 kept in bf16, re-quantised to NF4),
the share of s·BA that re-quantising keeps, the *control* (the adapters trained on the fp32
base put on the NF4 base without retraining, for the adapters on every layer and for those on
W_q and W_v only), and every configuration trained at the recipe's
rate (chapter 13's exercise on a shared learning rate). The first report seed's QLoRA and LoRA
runs also record their loss curves and the peak memory of a training step. Nothing here is a
timing.

Writes ``benchmarks/results/qlora_sweep-cpu.json``. Chapter 13 reads it and re-runs the two
main configurations of the first report seed live, checking them against it.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _provenance import provenance, write_result  # noqa: E402

from lora_edu.data import eval_batches, load_corpus  # noqa: E402
from lora_edu.lora import LoraConfig, LoRALinear, inject_lora  # noqa: E402
from lora_edu.models import load_pretrained  # noqa: E402
from lora_edu.progress import progress  # noqa: E402
from lora_edu.quant import (Linear4bit, LoRALinear4bit, inject_lora_4bit,  # noqa: E402
                            merge_qlora, merge_qlora_layer)
from lora_edu.repro import seed_all  # noqa: E402
from lora_edu.train import TrainConfig, evaluate, train  # noqa: E402

ALL_LINEAR = ["q", "k", "v", "o", "fc1", "fc2"]
RECIPE = TrainConfig(steps=30, batch_size=8, lr=3e-3, warmup_steps=3, eval_every=30,
                     eval_windows=32, measure_memory=False, show_progress=False)
LR_STEP, LR_MAX_EXTEND = 3.0, 2      # grid: RECIPE.lr · LR_STEP**k, k = -1, 0, 1 (+ extensions)
LOFTQ_ITERS = 5
SELECTION_SEEDS = (100, 101)
REPORT_SEEDS = tuple(range(8))
MAIN = ["LoRA, fp32 base", "QLoRA, NF4 base"]
QV = ["LoRA q,v, fp32 base", "QLoRA q,v, NF4 base"]
LOFTQ = "QLoRA + LoftQ start"
MERGES = {"into the original W0": "original", "into Ŵ0, kept in bf16": "dequantized",
          "into Ŵ0, re-quantised to NF4": "requantized"}
DEVICE = torch.device("cpu")


def lr_of(k: int) -> float:
    """The grid's k-th learning rate, RECIPE.lr · LR_STEP**k."""
    return RECIPE.lr * LR_STEP ** k


@dataclass
class Setup:
    """The model, corpora and windows every run shares.

    Attributes:
        pretrained: the toy GPT, never modified (runs load their own copy).
        kinds: name -> (base "fp32"/"nf4", target modules, r, LoftQ alternations).
        evals: corpus name -> validation tokens that ``train`` evaluates on (reported windows).
        report: the reported target windows, as (x, y) batches.
        tune: the tuning windows between them, as (x, y) batches.
        train_tokens: the target's training split.
    """

    pretrained: nn.Module
    kinds: dict[str, tuple[str, list[str], int, int]]
    evals: dict[str, torch.Tensor]
    report: list[tuple[torch.Tensor, torch.Tensor]]
    tune: list[tuple[torch.Tensor, torch.Tensor]]
    train_tokens: torch.Tensor


def setup() -> Setup:
    """Load the toy GPT and the corpora; cut the reported and the tuning windows."""
    source, target = load_corpus("python-stdlib"), load_corpus("python-docs")
    pretrained, _ = load_pretrained("gpt-cpu")
    d, d_ff = pretrained.config.d_model, pretrained.config.d_ff
    per_block_all = 4 * (d + d) + 2 * (d + d_ff)   # Σ (d + k) over q, k, v, o, fc1, fc2
    r_qv = 8 * per_block_all // (2 * (d + d))       # q, v only: as many parameters as r = 8
    kinds = {MAIN[0]: ("fp32", ALL_LINEAR, 8, 0), MAIN[1]: ("nf4", ALL_LINEAR, 8, 0),
             QV[0]: ("fp32", ["q", "v"], r_qv, 0), QV[1]: ("nf4", ["q", "v"], r_qv, 0),
             LOFTQ: ("nf4", ALL_LINEAR, 8, LOFTQ_ITERS)}
    block = pretrained.config.block_size
    report = eval_batches(target.val, block, RECIPE.eval_windows, RECIPE.batch_size)
    starts = torch.linspace(0, target.val.numel() - block - 1, RECIPE.eval_windows).long()
    assert torch.equal(torch.cat([x for x, _ in report]),   # the starts eval_batches uses
                       target.val[starts[:, None] + torch.arange(block)].long())
    tune_starts = (starts[:-1] + starts[1:]) // 2              # halfway between two reported
    assert ((tune_starts - starts[:-1] > block) & (starts[1:] - tune_starts > block)).all()
    windows = target.val[tune_starts[:, None] + torch.arange(block + 1)].long()
    tune = [(w[:, :-1], w[:, 1:]) for w in windows.split(RECIPE.batch_size)]
    return Setup(pretrained, kinds, {"target": target.val, "source": source.val}, report, tune,
                 target.train)


def build(s: Setup, kind: str, seed: int, lr: float, *, detailed: bool = False,
          evals: bool = True) -> tuple[nn.Module, Any]:
    """Load the toy GPT, put the adapters of ``kind`` on it, train: (model, History).

    ``seed`` sets A's random initialisation and the batch order; ``detailed`` also records the
    loss every quarter of the run and the peak memory of a step (neither changes the run).
    """
    base, targets, r, loftq_iters = s.kinds[kind]
    seed_all(seed)
    model, _ = load_pretrained("gpt-cpu")
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets)
    if base == "fp32":
        inject_lora(model, config)
    else:                 # every linear layer of the blocks in NF4, adapted or not
        inject_lora_4bit(model, config, loftq_iters=loftq_iters,
                         quantize_modules=ALL_LINEAR)
    recipe = replace(RECIPE, lr=lr, seed=seed, measure_memory=detailed,
                     eval_every=RECIPE.steps // 4 if detailed else RECIPE.steps)
    return model, train(model, s.train_tokens, s.evals if evals else None, recipe, DEVICE)


def loss_on(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Mean next-byte loss (nats per byte) of ``model`` on fixed ``batches``, in fp32."""
    return evaluate(model, batches, DEVICE, None)


def tune_kind(s: Setup, kind: str, seeds: tuple[int, ...]) -> dict[str, Any]:
    """The learning rate of ``kind`` with the lowest tuning loss, averaged over ``seeds``.

    Starts from k = -1, 0, 1; while the best is at an end, adds the next rate beyond it (at
    most ``LR_MAX_EXTEND`` times). Returns the grid's losses per seed and the choice.
    """
    losses: dict[int, list[float]] = {}
    todo = [-1, 0, 1]
    for extension in range(LR_MAX_EXTEND + 1):
        for k in todo:
            losses[k] = []
            for seed in seeds:
                model, _ = build(s, kind, seed, lr_of(k), evals=False)
                losses[k].append(loss_on(model, s.tune))
        mean = {k: sum(v) / len(v) for k, v in losses.items()}
        best = min(mean, key=mean.get)
        lo, hi = min(mean), max(mean)
        if best not in (lo, hi) or extension == LR_MAX_EXTEND:
            break
        todo = [best - 1] if best == lo else [best + 1]
    return {"grid": {str(k): lr_of(k) for k in sorted(losses)},
            "tuning_loss": {str(k): losses[k] for k in sorted(losses)},
            "chosen_k": best, "lr": lr_of(best), "at_edge": best in (lo, hi)}


def requant_share(model: nn.Module) -> dict[str, float]:
    """What re-quantising keeps of s·BA (its projection on s·BA, summed over the layers) and
    the share of packed bytes that change."""
    kept = total = changed = n_bytes = 0.0
    for layer in model.modules():
        if isinstance(layer, LoRALinear4bit):
            w_hat = layer.base.weight.float()
            delta = layer.delta_weight().detach().float()
            re4 = merge_qlora_layer(layer, "requantized")
            realised = re4.weight.float() - w_hat
            kept += float((realised * delta).sum())
            total += float(delta.pow(2).sum())
            changed += int((re4.packed != layer.base.packed).sum())
            n_bytes += layer.base.packed.numel()
    return {"requant_kept": kept / total, "requant_bytes_changed": changed / n_bytes}


def merge_losses(s: Setup, qlora: nn.Module) -> dict[str, float]:
    """Reported target loss of the QLoRA model unmerged and merged each of the three ways."""
    out = {"unmerged": loss_on(qlora, s.report)}
    for name, into in MERGES.items():
        kwargs = {"original": s.pretrained} if into == "original" else {}
        merged = merge_qlora(copy.deepcopy(qlora), into, **kwargs)
        out[name] = loss_on(merged.float(), s.report)   # bf16-stored values, fp32 arithmetic
    return out


def transplant(s: Setup, lora_fp32: nn.Module, kind: str = MAIN[1]) -> nn.Module:
    """The control: the adapters trained on the fp32 base, copied onto the NF4 base untrained.

    Same configuration as the NF4 run ``kind`` (``MAIN[1]``: r = 8 on every linear layer;
    ``QV[1]``: W_q and W_v only; either way the whole blocks in NF4 with double
    quantisation); only A and B come from ``lora_fp32``.
    """
    _, targets, r, _ = s.kinds[kind]
    model = inject_lora_4bit(copy.deepcopy(s.pretrained),
                             LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets),
                             quantize_modules=ALL_LINEAR)
    trained = dict(lora_fp32.named_modules())
    with torch.no_grad():
        for name, layer in model.named_modules():
            if isinstance(layer, LoRALinear4bit):
                source = trained[name]
                assert isinstance(source, LoRALinear) and not isinstance(source.base, Linear4bit)
                layer.lora_A.copy_(source.lora_A)
                layer.lora_B.copy_(source.lora_B)
    return model.eval()


def report_run(s: Setup, kind: str, seed: int, lr: float, detailed: bool) -> dict[str, Any]:
    """Train ``kind`` with a report seed at its chosen rate and measure what the chapter reads."""
    model, hist = build(s, kind, seed, lr, detailed=detailed)
    rec: dict[str, Any] = {"kind": kind, "seed": seed, "lr": lr,
                           "start_target": hist.eval_loss["target"][0],
                           "target": hist.final_eval("target"),
                           "source": hist.final_eval("source"),
                           "trainable": hist.trainable_params}
    if detailed:
        rec["curve"] = {"steps": hist.eval_steps, "target": hist.eval_loss["target"]}
        rec["peak_bytes"] = hist.memory.peak_bytes if hist.memory else None
    if kind == MAIN[1]:
        rec["merges"] = merge_losses(s, model)
        rec.update(requant_share(model))
    if kind == MAIN[0]:
        rec["transplant_target"] = loss_on(transplant(s, model), s.report)
    if kind == QV[0]:   # the same control for the adapters on W_q and W_v only
        rec["transplant_target"] = loss_on(transplant(s, model, QV[1]), s.report)
    return rec


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report-seeds", type=int, default=len(REPORT_SEEDS),
                        help="fresh seeds 0..N-1 for the reported runs")
    parser.add_argument("--selection-seeds", type=int, default=len(SELECTION_SEEDS),
                        help="seeds 100.. that choose the learning rates")
    parser.add_argument("--no-shared", action="store_true",
                        help="skip the runs at the recipe's rate (the exercise's data)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)     # one thread: the same sums in the same order on every re-run
    selection = tuple(100 + i for i in range(args.selection_seeds))
    report = tuple(range(args.report_seeds))
    s = setup()
    start = time.perf_counter()
    tuned = {kind: tune_kind(s, kind, selection)
             for kind in progress(list(s.kinds), desc="learning-rate grids")}
    runs = []
    jobs = [(kind, seed) for seed in report for kind in s.kinds]
    for kind, seed in progress(jobs, desc="report runs"):
        runs.append(report_run(s, kind, seed, tuned[kind]["lr"],
                               detailed=seed == report[0] and kind in MAIN))
    shared = []
    if not args.no_shared:
        for kind, seed in progress(jobs, desc="runs at the recipe's rate"):
            if math.isclose(tuned[kind]["lr"], RECIPE.lr):   # the same run as above
                rec = next(r for r in runs if r["kind"] == kind and r["seed"] == seed)
                shared.append({k: rec[k] for k in ("kind", "seed", "lr", "target", "source")
                               } | ({"merges": rec["merges"]} if "merges" in rec else {}))
                continue
            model, hist = build(s, kind, seed, RECIPE.lr)
            rec = {"kind": kind, "seed": seed, "lr": RECIPE.lr,
                   "target": hist.final_eval("target"), "source": hist.final_eval("source")}
            if kind == MAIN[1]:
                rec["merges"] = merge_losses(s, model)
            shared.append(rec)
    result = provenance("qlora_sweep", DEVICE)
    result.update({
        "seconds": round(time.perf_counter() - start, 1), "threads": 1,
        "recipe": {"steps": RECIPE.steps, "batch_size": RECIPE.batch_size, "lr": RECIPE.lr,
                   "warmup_steps": RECIPE.warmup_steps, "eval_windows": RECIPE.eval_windows},
        "lr_step": LR_STEP, "lr_max_extend": LR_MAX_EXTEND, "loftq_iters": LOFTQ_ITERS,
        "selection_seeds": list(selection), "report_seeds": list(report),
        "kinds": {k: {"base": b, "targets": t, "r": r, "loftq_iters": it}
                  for k, (b, t, r, it) in s.kinds.items()},
        "tuning": tuned, "runs": runs, "shared_lr_runs": shared,
    })
    write_result(result, "qlora_sweep", DEVICE, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
