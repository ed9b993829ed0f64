"""Chapter 14's task and its rsLoRA learning-rate-transfer sweep.

Usage:
    python benchmarks/variants_sweep.py                  # what was committed
    python benchmarks/variants_sweep.py --report-seeds 2 --selection-seeds 1 --out /tmp/v.json

The task (imported by chapter 14, so that the page and this sweep run the same code): a
"pretrained" two-layer network ``f(x) = W2 GELU(W1 x)`` with square D×D weights whose singular
values decay like 1/j, and a teacher that is the same network with every weight changed by a
full-rank ΔW* (singular values ∝ 1/√j, ‖ΔW*‖_F = 0.25 ‖W‖_F). A student, frozen at the
pretrained weights, gets LoRA (or a variant) on both layers and learns from fresh Gaussian
inputs with Adam. Its error is the mean squared error to the teacher relative to the
pretrained network's, on fixed held-out inputs: a **validation** set that chooses learning
rates and a **test** set that reports (different inputs, different generator seeds).

The sweep, for rsLoRA's claim (``EVIDENCE.md``): for each scaling (s = α/r, s = α/√r) and each
rank r in 4, 16, 64, 256, the learning rate with the lowest mean validation error over the
*selection seeds*, on a grid a factor 2 apart (a best at the grid's edge extends it); then
the test error at that rate on *fresh* report seeds, and the test error at the rate chosen
for the smallest rank, carried to every rank unchanged (what a user who does not retune
gets). A seed sets A's initialisation and the order of the inputs, so the two scalings with
one seed are a pair. Also the first Adam step's change of the outputs, per scaling and rank.

Writes ``benchmarks/results/variants_sweep-cpu.json`` (errors only: nothing here is a timing).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _provenance import provenance, write_result  # noqa: E402

from lora_edu.lora import LoraConfig, inject_lora  # noqa: E402
from lora_edu.progress import progress  # noqa: E402
from lora_edu.repro import seed_all  # noqa: E402
from lora_edu.variants import loraplus_param_groups  # noqa: E402

#: width D, Adam steps and inputs per step of each preset
PRESETS = {"cpu": (256, 120, 128), "gpu": (1024, 400, 512)}
N_HELD_OUT, DELTA_NORM = 1024, 0.25   # inputs per held-out set; ‖ΔW*‖_F / ‖W‖_F
VAL_SEED, TEST_SEED = 98, 99          # generators of the validation and the test inputs
SELECTION_SEEDS = tuple(range(100, 108))   # 8: one seed's pick moves by a factor 2-8
REPORT_SEEDS = (0, 1, 2, 3, 4)
RANKS, ALPHA = (4, 16, 64, 256), 8
LR_GRID = tuple(2.5e-4 * 2 ** k for k in range(8))   # 2.5e-4 … 3.2e-2
LR_STEP, MAX_EXTEND = 2.0, 2
FIRST_STEP_LR = 1e-3


def with_spectrum(d: int, decay: float, norm: float, gen: torch.Generator) -> torch.Tensor:
    """A random d×d matrix with singular values ∝ j^(−decay) and ‖W‖_F = norm."""
    U, _ = torch.linalg.qr(torch.randn(d, d, generator=gen))
    V, _ = torch.linalg.qr(torch.randn(d, d, generator=gen))
    sigma = torch.arange(1, d + 1, dtype=torch.float32) ** -decay
    W = (U * sigma) @ V.T
    return W * norm / W.norm()


class TwoLayer(nn.Module):
    """f(x) = W2 GELU(W1 x) with the given D×D weights (no biases)."""

    def __init__(self, W1: torch.Tensor, W2: torch.Tensor) -> None:
        super().__init__()
        d = W1.shape[0]
        self.l1 = nn.Linear(d, d, bias=False)
        self.l2 = nn.Linear(d, d, bias=False)
        with torch.no_grad():
            self.l1.weight.copy_(W1)
            self.l2.weight.copy_(W2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(F.gelu(self.l1(x)))


@dataclass
class Task:
    """The pretrained network, the teacher and the held-out inputs of one preset.

    Attributes:
        D, steps, batch: width, Adam steps per run and inputs per step.
        W_pre: the two pretrained D×D weights.
        pretrained, teacher: frozen networks on ``device``.
        x_val, x_test: (N_HELD_OUT, D) held-out inputs that choose and that report.
    """

    D: int
    steps: int
    batch: int
    device: torch.device
    W_pre: list[torch.Tensor]
    pretrained: nn.Module
    teacher: nn.Module
    x_val: torch.Tensor
    x_test: torch.Tensor


def make_task(preset: str = "cpu", device: torch.device | str = "cpu") -> Task:
    """Build the preset's task (the same weights for the same preset, on any device)."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    D, steps, batch = PRESETS[preset]
    device = torch.device(device)
    gen = torch.Generator().manual_seed(0)
    W_pre = [with_spectrum(D, 1.0, math.sqrt(D), gen) for _ in range(2)]
    W_new = [W + with_spectrum(D, 0.5, DELTA_NORM * W.norm().item(), gen) for W in W_pre]

    def inputs(seed: int) -> torch.Tensor:
        return torch.randn(N_HELD_OUT, D, generator=torch.Generator().manual_seed(seed))

    return Task(D, steps, batch, device, W_pre,
                TwoLayer(*W_pre).to(device).requires_grad_(False),
                TwoLayer(*W_new).to(device).requires_grad_(False),
                inputs(VAL_SEED).to(device), inputs(TEST_SEED).to(device))


def teacher_like(task: Task, weights: Sequence[torch.Tensor]) -> nn.Module:
    """A frozen teacher with the given weights (for tasks other than the random change)."""
    return TwoLayer(*weights).to(task.device).requires_grad_(False)


def student(task: Task, r: int, alpha: float, seed: int = 0, **variant: Any) -> nn.Module:
    """The pretrained network with LoRA (or a variant, via LoraConfig) on both layers.

    ``seed`` draws A's initialisation (``seed_all(1 + seed)``).
    """
    seed_all(1 + seed)
    model = TwoLayer(*task.W_pre).to(task.device)
    return inject_lora(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=["l1", "l2"],
                                         **variant))


@torch.no_grad()
def error(task: Task, model: nn.Module, target: nn.Module, x: torch.Tensor) -> float:
    """MSE of ``model`` to ``target`` on inputs ``x``, relative to the pretrained network's."""
    base = F.mse_loss(task.pretrained(x), target(x))
    return (F.mse_loss(model(x), target(x)) / base).item()


@dataclass
class Run:
    """One training run: its training curve (MSE / MSE at step 0) and held-out errors."""

    curve: list[float]
    val: float
    test: float


def train(task: Task, model: nn.Module, lr: float, ratio: float = 1.0, seed: int = 0,
          target: nn.Module | None = None) -> Run:
    """Adam on fresh Gaussian inputs (their order set by ``seed``); LoRA+ when ratio ≠ 1."""
    target = task.teacher if target is None else target
    opt = torch.optim.Adam(loraplus_param_groups(model, lr, ratio))
    gen = torch.Generator(device=task.device).manual_seed(1000 + seed)
    losses = []
    for _ in range(task.steps):
        x = torch.randn(task.batch, task.D, generator=gen, device=task.device)
        loss = F.mse_loss(model(x), target(x))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return Run([v / losses[0] for v in losses], error(task, model, target, task.x_val),
               error(task, model, target, task.x_test))


def choose_lr(val_error: Callable[[float, int], float], grid: Sequence[float],
              seeds: Sequence[int], step: float = LR_STEP,
              max_extend: int = MAX_EXTEND) -> dict[str, Any]:
    """The rate of ``grid`` with the lowest mean of ``val_error(lr, seed)`` over ``seeds``.

    A best at either end of the grid extends it by one rate (``step`` beyond), at most
    ``max_extend`` times. Returns ``{"lr", "grid", "val" (lr -> per-seed errors), "at_edge"}``.
    """
    grid = sorted(grid)
    val: dict[float, list[float]] = {}
    todo = list(grid)
    for extension in range(max_extend + 1):
        for lr in todo:
            val[lr] = [val_error(lr, s) for s in seeds]
        mean = {lr: statistics.fmean(v) for lr, v in val.items()}
        best = min(mean, key=mean.get)
        lo, hi = min(mean), max(mean)
        if best not in (lo, hi) or extension == max_extend:
            break
        todo = [best / step] if best == lo else [best * step]
    return {"lr": best, "grid": sorted(val), "val": {lr: val[lr] for lr in sorted(val)},
            "at_edge": best in (lo, hi)}


def first_step_change(task: Task, r: int, use_rslora: bool, lr: float = FIRST_STEP_LR,
                      seed: int = 0) -> float:
    """How far one Adam step from B = 0 moves the student's outputs on the test inputs.

    Returned as the RMS change of the outputs divided by the RMS change the task asks for
    (teacher − pretrained), so 0.01 is 1 % of the way in size (not in direction). Adam's first
    step moves every entry of B by ±lr whatever the gradient's size (m̂/√v̂ is the gradient's
    sign), and A not at all (its gradient is zero while B = 0).
    """
    model = student(task, r, ALPHA, seed, use_rslora=use_rslora)
    before = model(task.x_test).detach()
    opt = torch.optim.Adam(loraplus_param_groups(model, lr, 1.0))
    gen = torch.Generator(device=task.device).manual_seed(1000 + seed)
    x = torch.randn(task.batch, task.D, generator=gen, device=task.device)
    F.mse_loss(model(x), task.teacher(x)).backward()
    opt.step()
    with torch.no_grad():
        wanted = (task.teacher(task.x_test) - task.pretrained(task.x_test)).pow(2).mean().sqrt()
        return ((model(task.x_test) - before).pow(2).mean().sqrt() / wanted).item()


def scaling_name(use_rslora: bool) -> str:
    return "alpha/sqrt(r)" if use_rslora else "alpha/r"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report-seeds", type=int, default=len(REPORT_SEEDS))
    parser.add_argument("--selection-seeds", type=int, default=len(SELECTION_SEEDS))
    parser.add_argument("--ranks", type=int, nargs="+", default=list(RANKS))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)     # one thread: the same sums in the same order on every re-run
    device = torch.device("cpu")
    task = make_task("cpu", device)
    selection = tuple(100 + i for i in range(args.selection_seeds))
    report = tuple(range(args.report_seeds))
    ranks = tuple(args.ranks)
    start = time.perf_counter()
    chosen: dict[str, dict[int, Any]] = {}
    for rs in progress([False, True], desc="scalings"):
        chosen[scaling_name(rs)] = {}
        for r in ranks:
            def val_error(lr: float, seed: int, r: int = r, rs: bool = rs) -> float:
                return train(task, student(task, r, ALPHA, seed, use_rslora=rs), lr,
                             seed=seed).val
            chosen[scaling_name(rs)][r] = choose_lr(val_error, LR_GRID, selection)
    runs = []
    for rs in progress([False, True], desc="report runs"):
        name = scaling_name(rs)
        carried = chosen[name][ranks[0]]["lr"]
        for r in ranks:
            lrs = {"best": chosen[name][r]["lr"], "carried": carried}
            for arm, lr in lrs.items():
                if arm == "carried" and math.isclose(lr, lrs["best"]):
                    continue   # the same runs as "best"
                for seed in report:
                    run = train(task, student(task, r, ALPHA, seed, use_rslora=rs), lr,
                                seed=seed)
                    runs.append({"scaling": name, "r": r, "arm": arm, "lr": lr, "seed": seed,
                                 "val": run.val, "test": run.test})
    first = {scaling_name(rs): {r: first_step_change(task, r, rs) for r in ranks}
             for rs in (False, True)}
    result = provenance("variants_sweep", device)
    result.update({
        "seconds": round(time.perf_counter() - start, 1), "threads": 1,
        "preset": "cpu", "D": task.D, "steps": task.steps, "batch": task.batch,
        "alpha": ALPHA, "ranks": list(ranks), "lr_grid": list(LR_GRID), "lr_step": LR_STEP,
        "max_extend": MAX_EXTEND, "selection_seeds": list(selection),
        "report_seeds": list(report),
        "chosen": {name: {str(r): {"lr": c["lr"], "at_edge": c["at_edge"],
                                   "grid": c["grid"],
                                   "val": [c["val"][lr] for lr in c["grid"]]}
                          for r, c in per_rank.items()} for name, per_rank in chosen.items()},
        "runs": runs,
        "first_step": {"lr": FIRST_STEP_LR, "seed": 0, "output_change_over_wanted":
                       {name: {str(r): v for r, v in d.items()} for name, d in first.items()}},
    })
    write_result(result, "variants_sweep", device, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
