"""What DoRA costs over LoRA in a training step: wall-clock time (paired rounds) and peak memory.

Usage:
    python benchmarks/dora_cost.py                       # the committed figures (idle machine)
    python benchmarks/dora_cost.py --no-timing           # peak memory only (any machine)
    python benchmarks/dora_cost.py --rounds 3 --models toy-gpt --out /tmp/d.json   # a try

Models (``--models``): ``toy-gpt`` (the book's GPT, the device's preset, LoRA r = 8, α = 16 on
every linear layer of the blocks, a batch of 8 × 128 tokens on a CPU), ``two-layer``
(chapter 14's task network, D = 256, both layers, a batch of 128 inputs) and ``smollm2``
(SmolLM2-135M, q_proj and v_proj of every layer, 4 × 64 tokens; needs the cached model).

Arms, each one AdamW step (forward, backward, update) on the adapter parameters, with the same
weights and the same non-zero A and B: LoRA and DoRA (norm detached, the paper's §4.3 and
PEFT's default) in ``lora_edu``, and LoRA and DoRA in Hugging Face PEFT, whose
``use_dora=True`` is what users run.

Timing follows ``EVIDENCE.md`` §5: the arms run interleaved in rounds (every round times each
arm once, in a rotated order, after warm-up rounds); each round gives the ratio DoRA / LoRA
within each implementation, and the figure is the **median of the per-round ratios** with
their range and quartiles; the load average is recorded before and after. Run it on an idle
machine; a run taken while another job ran is re-measured, not explained. The CPU clock is
wall time with the chosen number of threads (``--threads``, default 1).

Peak memory of one step (``torch.cuda.max_memory_allocated`` on a GPU, PyTorch's MemTracker
on the CPU) is measured after the timing, per arm; it does not depend on the machine's load.
The two-layer network's peaks are also measured at several batch sizes
(``--memory-batches``), because DoRA's extra memory grows with the batch. The load average at
the start and the end is compared with ``--max-load`` (``idle`` in the JSON).

Writes ``benchmarks/results/dora_cost-<device>.json``.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _provenance import provenance, write_result  # noqa: E402

from lora_edu.lora import LoraConfig, inject_lora, lora_layers  # noqa: E402
from lora_edu.models import GPT, gpt_config  # noqa: E402
from lora_edu.repro import get_device, seed_all  # noqa: E402
from lora_edu.train import cpu_step_peak  # noqa: E402

with warnings.catch_warnings():  # peft imports tqdm.auto, which warns without ipywidgets
    warnings.simplefilter("ignore")
    import peft

ARMS = ("lora_edu LoRA", "lora_edu DoRA", "PEFT LoRA", "PEFT DoRA")
PAIRS = {"lora_edu": ("lora_edu DoRA", "lora_edu LoRA"), "PEFT": ("PEFT DoRA", "PEFT LoRA")}
MODELS = ("toy-gpt", "two-layer", "smollm2")


class TwoLayer(nn.Module):
    """Chapter 14's network shape: two D×D layers with a GELU between them."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.l1 = nn.Linear(d, d, bias=False)
        self.l2 = nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(F.gelu(self.l1(x)))


def base_and_batch(name: str, device: torch.device, batch: int | None = None
                   ) -> tuple[nn.Module, list[str], int, Callable[[nn.Module], torch.Tensor]]:
    """(base model, target modules, r, loss(model) on a fixed batch) for one model name.

    ``batch`` overrides the two-layer network's batch of 128 inputs (the memory-by-batch table).
    """
    gen = torch.Generator().manual_seed(1)
    seed_all(0)
    if name == "toy-gpt":
        preset = "gpu" if device.type == "cuda" else "cpu"
        batch, block = (32, 256) if device.type == "cuda" else (8, 128)
        model = GPT(gpt_config(preset)).to(device)
        x, y = torch.randint(0, 256, (2, batch, block), generator=gen).to(device)
        return (model, ["q", "k", "v", "o", "fc1", "fc2"], 8,
                lambda m: F.cross_entropy(m(x).flatten(0, 1), y.flatten()))
    if name == "two-layer":
        d, batch = 256, batch or 128
        model = TwoLayer(d).to(device)
        x = torch.randn(batch, d, generator=gen).to(device)
        target = torch.randn(batch, d, generator=gen).to(device)
        return model, ["l1", "l2"], 8, lambda m: F.mse_loss(m(x), target)
    if name == "smollm2":
        from lora_edu.pretrained import load_smollm2
        model, _ = load_smollm2(device=device)
        ids = torch.randint(0, model.config.vocab_size, (4, 64), generator=gen).to(device)
        return (model, ["q_proj", "v_proj"], 8,
                lambda m: m(input_ids=ids, labels=ids).loss)
    raise ValueError(f"unknown model {name!r}; choose from {MODELS}")


def describe(name: str, device: torch.device) -> str:
    """What ``name`` measures on ``device``, in words (the chapter prints it from the JSON)."""
    if name == "toy-gpt":
        preset, shape = ("gpu", "32 × 256") if device.type == "cuda" else ("cpu", "8 × 128")
        return (f"the book's toy GPT ({preset} preset), LoRA r = 8 on every linear layer of "
                f"the blocks, a batch of {shape} tokens (a toy width)")
    if name == "two-layer":
        return "chapter 14's two-layer network, D = 256, both layers, 128 inputs (a toy width)"
    return "SmolLM2-135M, q_proj and v_proj of every layer, 4 × 64 tokens (the real model)"


def build_arms(base: nn.Module, targets: list[str], r: int) -> dict[str, nn.Module]:
    """The four arms on copies of ``base``, with the same non-zero A and B (and m = ‖W0+sBA‖)."""
    arms = {}
    for dora in (False, True):
        ours = inject_lora(copy.deepcopy(base), LoraConfig(
            r=r, lora_alpha=2 * r, target_modules=targets, use_dora=dora))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            wrapped = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
                r=r, lora_alpha=2 * r, target_modules=targets, use_dora=dora))
        theirs = wrapped.get_base_model()
        modules = dict(theirs.named_modules())
        with torch.no_grad():
            for name, layer in lora_layers(ours):
                layer.lora_B.normal_(std=0.02)      # a trained-looking B: nothing trivially 0
                if dora:
                    layer.reset_magnitude()
                theirs_layer = modules[name]
                theirs_layer.lora_A["default"].weight.copy_(layer.lora_A)
                theirs_layer.lora_B["default"].weight.copy_(layer.lora_B)
                if dora:
                    theirs_layer.lora_magnitude_vector["default"].weight.copy_(layer.magnitude)
        kind = "DoRA" if dora else "LoRA"
        arms[f"lora_edu {kind}"], arms[f"PEFT {kind}"] = ours.train(), theirs.train()
    return arms


def train_step(model: nn.Module, loss: Callable[[nn.Module], torch.Tensor]
               ) -> tuple[Callable[[], None], torch.optim.Optimizer]:
    """One AdamW step on the trainable parameters; one untimed step first creates the state."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step() -> None:
        loss(model).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    return step, optimizer


def paired_rounds(steps: dict[str, Callable[[], None]], rounds: int, warmup: int,
                  device: torch.device) -> dict[str, list[float]]:
    """Seconds per step of each arm, round by round, the order rotated every round."""
    names = list(steps)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {n: [] for n in names}
    for rnd in range(warmup + rounds):
        for name in names[rnd % len(names):] + names[:rnd % len(names)]:
            sync()
            t0 = time.perf_counter()
            steps[name]()
            sync()
            if rnd >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def ratio_summary(num: list[float], den: list[float]) -> dict[str, float]:
    """Median, quartiles and range of the per-round ratios num[i] / den[i]."""
    ratios = sorted(a / b for a, b in zip(num, den))
    q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
    return {"median_ratio": round(statistics.median(ratios), 4), "q1": round(q1, 4),
            "q3": round(q3, 4), "min": round(ratios[0], 4), "max": round(ratios[-1], 4),
            "rounds": len(ratios)}


def peak_bytes(step: Callable[[], None], model: nn.Module, *existing: object,
               device: torch.device) -> int | None:
    """Peak bytes alive during ``step()`` (model, optimizer state and batch included)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return cpu_step_peak(step, model, *existing).get("peak")


def measure(name: str, device: torch.device, rounds: int, warmup: int,
            timing: bool) -> dict[str, Any]:
    """Every figure of one model: per-arm medians, paired ratios, peak bytes and their ratios."""
    base, targets, r, loss = base_and_batch(name, device)
    arms = build_arms(base, targets, r)
    steps = {arm: train_step(model, loss) for arm, model in arms.items()}
    out: dict[str, Any] = {"description": describe(name, device), "targets": targets, "r": r,
                           "lora_alpha": 2 * r}
    if timing:
        times = paired_rounds({a: s for a, (s, _) in steps.items()}, rounds, warmup, device)
        out["step_ms_median"] = {a: round(1e3 * statistics.median(t), 4)
                                 for a, t in times.items()}
        out["dora_over_lora_time"] = {impl: ratio_summary(times[d], times[lo])
                                      for impl, (d, lo) in PAIRS.items()}
    # memory last: MemTracker's hooks would slow the steps that follow
    peaks = {arm: peak_bytes(step, arms[arm], opt, device=device)
             for arm, (step, opt) in steps.items()}
    out["peak_bytes"] = peaks
    out["dora_over_lora_peak_memory_ratio"] = {
        impl: (round(peaks[d] / peaks[lo], 4) if peaks[d] and peaks[lo] else None)
        for impl, (d, lo) in PAIRS.items()}
    return out


def memory_by_batch(device: torch.device, batches: list[int]) -> dict[str, Any]:
    """Peak bytes of one step of each arm on the two-layer network, for each batch size.

    With the norm detached, W0 + s·BA exists only while the forward computes the norm (one
    D×D matrix per layer, freed before the backward); what DoRA keeps *for* the backward is
    per input: W0 x̃ and s·BA x̃, (batch, D) each per layer, which the magnitude's gradient
    needs. So DoRA's extra peak over LoRA grows with the batch.
    """
    out: dict[str, Any] = {}
    for batch in batches:
        base, targets, r, loss = base_and_batch("two-layer", device, batch)
        arms = build_arms(base, targets, r)
        steps = {arm: train_step(model, loss) for arm, model in arms.items()}
        peaks = {arm: peak_bytes(step, arms[arm], opt, device=device)
                 for arm, (step, opt) in steps.items()}
        out[str(batch)] = {
            "peak_bytes": peaks,
            "dora_minus_lora_bytes": {impl: (peaks[d] - peaks[lo]
                                             if peaks[d] and peaks[lo] else None)
                                      for impl, (d, lo) in PAIRS.items()}}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--rounds", type=int, default=30, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--no-timing", action="store_true",
                        help="peak memory only (timings need an idle machine)")
    parser.add_argument("--memory-batches", type=int, nargs="+", default=[8, 128, 1024],
                        help="batch sizes of the two-layer network's peak-memory table")
    parser.add_argument("--max-load", type=float, default=0.5,
                        help="1-min load average (beyond this run's own threads) above which "
                             "a timing counts as not idle")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = get_device()
    load_start = os.getloadavg()[0]
    figures = {}
    for name in args.models:
        try:
            figures[name] = measure(name, device, args.rounds, args.warmup, not args.no_timing)
        except (FileNotFoundError, RuntimeError, OSError) as err:   # e.g. SmolLM2 not cached
            figures[name] = {"skipped": f"{type(err).__name__}: {err}"}
        print(name, figures[name])
    by_batch = memory_by_batch(device, args.memory_batches)
    print("two-layer peak bytes by batch", by_batch)
    load_end = os.getloadavg()[0]
    result = provenance("dora_cost", device)
    result.update({
        "peft": peft.__version__, "torch_threads": torch.get_num_threads(),
        "timing": not args.no_timing, "rounds": args.rounds, "warmup": args.warmup,
        "load_average_1min": {"start": round(load_start, 2), "end": round(load_end, 2),
                              "threshold": args.max_load,
                              # the load at the end counts this run's own threads: what
                              # counts against "idle" is the load beyond them
                              "own_threads": torch.get_num_threads(),
                              "idle": max(load_start, load_end - torch.get_num_threads())
                              <= args.max_load},
        "statistic": "per-round ratio DoRA/LoRA within one implementation, rounds interleaved "
                     "(order rotated); median with quartiles and range. Peak memory of one "
                     "step, measured after the timing.",
        "figures": figures,
        "two_layer_peak_by_batch": by_batch,
    })
    write_result(result, "dora_cost", device, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
