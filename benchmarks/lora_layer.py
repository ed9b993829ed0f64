"""LoRA training step and merged inference: lora_edu against Hugging Face PEFT, side by side.

Usage: python benchmarks/lora_layer.py [--repeats N] [--threads T]

One run, one base model (the book's GPT, seeded), one config (``r``, α = 2r, ``q`` and ``v``):

* **training step** (forward + backward + AdamW step on the LoRA parameters) of the model with
  lora_edu's ``LoRALinear`` and of the same model with PEFT's ``lora.Linear`` (same A and B),
  the two arms alternating within each round; and the peak memory of one step
  (``torch.cuda.max_memory_allocated`` on a GPU, PyTorch's ``MemTracker`` on the CPU).
  Target: lora_edu / PEFT not above 1 (the step-time interval's upper end at most 1, or
  indistinguishable from 1), peak memory ratio ≤ 1.00.
* **merged inference**: a forward pass of the base model against the LoRA model after
  ``merge_lora`` (wrappers kept) and after ``merge_and_unload`` (plain layers back: the same
  architecture as the base, so its ratio is the run's identical-work control, expected
  indistinguishable from 1).

Every time ratio is :func:`lora_edu.serving.round_ratio` of the per-round times (EVIDENCE.md
§5): the median of the per-round ratios with their quartiles and the 95 % interval of the
geometric-mean ratio. Run it on an idle machine (the 1-minute load average is recorded).

Writes ``benchmarks/results/lora_layer-<device>.json``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import statistics
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lora_edu.lora import LoraConfig, inject_lora, lora_layers, merge_and_unload, merge_lora
from lora_edu.models import GPT, gpt_config
from lora_edu.report import show_table
from lora_edu.repro import get_device, seed_all
from lora_edu.serving import interleaved_timings, round_ratio
from lora_edu.train import cpu_step_peak

from _provenance import provenance, write_result  # benchmarks/ is on sys.path

with warnings.catch_warnings():  # peft imports tqdm.auto, which warns without ipywidgets
    warnings.simplefilter("ignore")
    import peft

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {  # model preset, sequences per batch, tokens per sequence, LoRA rank
    "cpu": {"preset": "cpu", "batch": 8, "block": 128, "r": 8},
    "cuda": {"preset": "gpu", "batch": 32, "block": 256, "r": 16},
}


def build(device: torch.device, s: dict) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(base, lora_edu model, PEFT model): the same weights, the same non-zero A and B."""
    seed_all(0)
    base = GPT(gpt_config(s["preset"])).to(device)
    ours = inject_lora(copy.deepcopy(base), LoraConfig(r=s["r"], lora_alpha=2 * s["r"],
                                                       target_modules=["q", "v"]))
    wrapped = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=s["r"], lora_alpha=2 * s["r"], target_modules=["q", "v"]))
    theirs = wrapped.get_base_model()  # the GPT with PEFT's layers inside, without the wrapper
    peft_modules = dict(theirs.named_modules())
    with torch.no_grad():
        for name, layer in lora_layers(ours):
            layer.lora_B.normal_(std=0.02)  # a trained-looking B, so no gradient is trivially 0
            peft_modules[name].lora_A["default"].weight.copy_(layer.lora_A)
            peft_modules[name].lora_B["default"].weight.copy_(layer.lora_B)
    return base, ours, theirs


def train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    """One AdamW step on the trainable parameters (created once, reused by every call)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # AdamW's state exists from here on, so every timed step is alike
    step.optimizer = optimizer  # type: ignore[attr-defined]
    return step


def peak_bytes(step: Callable[[], None], model: nn.Module, *existing: object) -> int:
    """Peak bytes alive during ``step()``, model, optimizer state and batch included."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    peak = cpu_step_peak(step, model, *existing).get("peak")
    if peak is None:
        raise RuntimeError("PyTorch's MemTracker could not measure the CPU peak in this build")
    return peak


def median_ms(times: list[float]) -> float:
    return round(1e3 * statistics.median(times), 4)


def ratio(a: list[float], b: list[float]) -> dict:
    """``a / b`` over paired rounds (:func:`round_ratio`) as JSON: its figures and verdict
    ("higher", "lower" or "indistinguishable": does the 95 % interval exclude 1?)."""
    rr = round_ratio(a, b)
    fields = {k: (round(v, 4) if isinstance(v, float) else v)
              for k, v in dataclasses.asdict(rr).items() if k != "ratios"}
    return {**fields, "verdict": rr.verdict}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=30, help="timed rounds per candidate")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads; 1 gives stable timings on a busy shared machine")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    device = get_device()
    s = SETTINGS["cuda" if device.type == "cuda" else "cpu"]
    base, ours, theirs = build(device, s)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 256, (2, s["batch"], s["block"]), generator=gen).to(device)

    steps = {"lora_edu": train_step(ours, x, y), "peft": train_step(theirs, x, y)}
    train_times = interleaved_timings(steps, repeats=args.repeats)
    # Peak memory last, on the models as they are: MemTracker's hooks would slow later steps.
    peaks = {name: peak_bytes(fn, model, fn.optimizer, x, y)  # type: ignore[attr-defined]
             for (name, fn), model in zip(steps.items(), (ours, theirs))}

    base.eval(), ours.eval()
    merged = merge_lora(copy.deepcopy(ours))
    unloaded = merge_and_unload(copy.deepcopy(ours))
    with torch.inference_mode():
        # a forward pass is cheap, so take more rounds: the ratio's target is within 1 %
        infer_times = interleaved_timings({"base": lambda: base(x), "merged": lambda: merged(x),
                                           "merged_and_unloaded": lambda: unloaded(x)},
                                          repeats=3 * args.repeats)
        drift = (merged(x) - ours(x)).abs().max().item()

    t = {k: median_ms(v) for k, v in {**train_times, **infer_times}.items()}
    ratios = {"step_time": ratio(train_times["lora_edu"], train_times["peft"]),
              "merged_inference": ratio(infer_times["merged"], infer_times["base"]),
              # identical work: the control that shows this run's timing resolution
              "merged_and_unloaded_inference": ratio(infer_times["merged_and_unloaded"],
                                                     infer_times["base"])}
    figures = {
        "train_step_ms_lora_edu": t["lora_edu"], "train_step_ms_peft": t["peft"],
        "peak_bytes_lora_edu": peaks["lora_edu"], "peak_bytes_peft": peaks["peft"],
        "peak_memory_ratio": round(peaks["lora_edu"] / peaks["peft"], 4),
        "inference_ms_base": t["base"], "inference_ms_merged": t["merged"],
        "inference_ms_merged_and_unloaded": t["merged_and_unloaded"],
        "merged_max_abs_logit_drift": drift,
    }
    show_table([[k, v] for k, v in figures.items()]
               + [[f"{k} ratio", (f"{r['median']:.3f} (95 % CI of the geometric mean "
                                  f"{r['low']:.3f} to {r['high']:.3f}): {r['verdict']}")]
                  for k, r in ratios.items()], ["figure", "value"],
               title=f"LoRA layer benchmark on {device} ({args.repeats} paired rounds, "
                     f"{3 * args.repeats} for inference)")
    result = {
        **provenance("lora_layer", device),
        "torch_threads": torch.get_num_threads(),
        # a shared machine's other work skews timings; interleaving spreads it evenly
        "load_average_1min": {"start": round(load_before, 2), "end": round(os.getloadavg()[0], 2)},
        "peft": peft.__version__,
        "settings": {**s, "lora_alpha": 2 * s["r"], "target_modules": ["q", "v"],
                     "repeats": args.repeats,
                     "statistic": "ratios: lora_edu.serving.round_ratio of interleaved "
                                  "rounds (3x as many for inference); times: medians; "
                                  "memory: peak of one step",
                     "noise_control": "merged_and_unloaded has exactly the base model's "
                                      "architecture and shapes, so its ratio to the base "
                                      "shows the timing resolution of this run",
                     "targets": {"step_time": "not higher than 1 (interval)",
                                 "peak_memory_ratio": "<= 1.00"}},
        "figures": figures,
        "ratios": ratios,
        "times_s": {k: [round(v, 7) for v in vs]
                    for k, vs in {**train_times, **infer_times}.items()},
    }
    write_result(result, "lora_layer", device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
