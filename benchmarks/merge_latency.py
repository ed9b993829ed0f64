"""Inference latency of LoRA merged, unmerged and bottleneck adapters, in the shape of Table 1.

Usage: python benchmarks/merge_latency.py [--rounds N] [--quick] [--out PATH]

Run it on an otherwise idle machine (the load average is recorded at the start and the end).
The small GPT (``cpu`` preset on a CPU, ``gpu`` preset on a GPU) runs one forward pass in five
versions: the base model, a second copy of the base (an A/A control: its ratio to the base must
come out indistinguishable from 1), LoRA on W_q and W_v merged, the same LoRA unmerged, and
Houlsby adapters after the attention output and the MLP of every block ("AdapterH"). Shapes
follow the LoRA paper's Table 1 (batch × sequence 32×512, 16×256, 1×128 on a GPU; scaled down
on a CPU: 8×128, 2×64, 1×16 at width 128).

A single forward pass at the smallest shapes lasts about a millisecond, too short to time
alone, so every timing runs a fixed number of forward passes, the same for every version of a
shape: enough that each timing covers as many tokens as one pass of the largest shape
(``calls_per_timing`` in the settings; times are written per forward pass).

Statistics (``../shared/EVIDENCE.md`` §5): each round runs every version and control back to
back in a fresh random order (seeded, :func:`lora_edu.serving.round_orders`: a fixed rotation
would let one version always follow the same neighbour); each version's time relative to the
base is the geometric mean of the per-round ratios with its own 95 % interval (paired over
rounds, :func:`lora_edu.serving.round_ratio`; their median and quartiles are stored as the
spread). On a GPU the clock is elapsed time; on
a CPU it is the CPU time of the one thread PyTorch runs on, so a CPU figure is a one-thread
figure at toy width.
Writes ``benchmarks/results/merge_latency-<device>.json`` with every round's milliseconds, the
ratios, and the paper's figures for reference.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
import zlib
from pathlib import Path

import torch
from _provenance import provenance, write_result  # benchmarks/ is on sys.path
from torch import nn

from lora_edu.lora import LoraConfig, inject_lora, lora_layers, merge_lora
from lora_edu.models import GPT, gpt_config
from lora_edu.report import show_table
from lora_edu.repro import get_device, seed_all
from lora_edu.serving import (
    BottleneckAdapter,
    add_bottleneck_adapters,
    interleaved_timings,
    round_ratio,
)

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"cuda": [(32, 512), (16, 256), (1, 128)], "cpu": [(8, 128), (2, 64), (1, 16)]}
#: Hu et al. (2022), Table 1: GPT-2 medium, Quadro RTX8000, ms per forward pass.
PAPER_MS = {"32x512": {"fine-tuned or merged LoRA": 1449.4, "AdapterL": 1482.0,
                       "AdapterH": 1492.2},
            "16x256": {"fine-tuned or merged LoRA": 338.0, "AdapterL": 354.8,
                       "AdapterH": 366.3},
            "1x128": {"fine-tuned or merged LoRA": 19.8, "AdapterL": 23.9, "AdapterH": 25.8}}


def build_versions(device: torch.device, block: int) -> dict[str, nn.Module]:
    """The versions of the GPT, with non-zero adapters (nothing is skipped), and the controls:
    two more copies of the base (``base_again``, ``base_copy3``: how far copies of one model
    are timed apart) and the base object itself under a second name (``base_same``: how far
    one object is timed from itself, which only the round order and noise can move)."""
    seed_all(0)
    base = GPT(gpt_config("gpu" if device.type == "cuda" else "cpu", block_size=block))
    base = base.to(device).eval()
    unmerged = inject_lora(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16,
                                                           target_modules=["q", "v"]))
    for _, layer in lora_layers(unmerged):
        nn.init.normal_(layer.lora_B, std=0.02)
    adapter = add_bottleneck_adapters(copy.deepcopy(base), bottleneck=16)
    for m in adapter.modules():
        if isinstance(m, BottleneckAdapter):
            nn.init.normal_(m.up.weight, std=0.02)
    return {"base": base, "base_same": base, "base_again": copy.deepcopy(base),
            "base_copy3": copy.deepcopy(base),
            "lora_merged": merge_lora(copy.deepcopy(unmerged)), "lora_unmerged": unmerged,
            "adapter_h": adapter}


def calls_per_timing(shapes: list[tuple[int, int]]) -> dict[str, int]:
    """Forward passes per timing for each shape: batch·seq tokens times this count matches the
    largest shape's tokens (at least one pass)."""
    most = max(b * t for b, t in shapes)
    return {f"{b}x{t}": max(1, most // (b * t)) for b, t in shapes}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30, help="paired rounds (default 30)")
    parser.add_argument("--quick", action="store_true",
                        help="3 rounds, written to /tmp unless --out says otherwise: checks the "
                             "script runs (figures meaningless)")
    parser.add_argument("--out", type=Path, default=None,
                        help="result file (default benchmarks/results/merge_latency-<device>.json)")
    args = parser.parse_args()
    if args.quick:
        args.rounds = 3
        args.out = args.out or Path("/tmp/merge_latency-quick.json")
    device = get_device()
    if device.type == "cpu":
        torch.set_num_threads(1)
    load_start, t_start = os.getloadavg(), time.time()
    shapes = SHAPES["cuda" if device.type == "cuda" else "cpu"]
    clock = "wall" if device.type == "cuda" else "thread"
    versions = build_versions(device, max(t for _, t in shapes))
    repeat = calls_per_timing(shapes)
    figures, rows = {}, []

    def passes(model: nn.Module, x: torch.Tensor, n: int):
        def call() -> None:
            for _ in range(n):   # the same count for every version of this shape
                model(x)
        return call

    with torch.inference_mode():
        for batch, seq in shapes:
            idx = torch.randint(0, 256, (batch, seq), device=device)
            reps = repeat[f"{batch}x{seq}"]
            calls = {name: passes(m, idx, reps) for name, m in versions.items()}
            # each shape draws its own round orders, so an order effect does not repeat
            times = interleaved_timings(calls, repeats=args.rounds, warmup=2, clock=clock,
                                        seed=zlib.crc32(f"{batch}x{seq}".encode()))
            times = {name: [v / reps for v in t] for name, t in times.items()}  # per pass
            ratios = {n: round_ratio(t, times["base"]) for n, t in times.items() if n != "base"}
            figures[f"{batch}x{seq}"] = {
                "median_ms": {n: round(1e3 * statistics.median(t), 4) for n, t in times.items()},
                "over_base": {n: r.as_dict() for n, r in ratios.items()},
                "per_round_ms": {n: [round(1e3 * v, 5) for v in t] for n, t in times.items()}}
            rows.append((batch, seq, 1e3 * statistics.median(times["base"]),
                         *(ratios[n].geomean for n in ("base_again", "lora_merged",
                                                       "lora_unmerged", "adapter_h"))))
    show_table(rows, ["batch", "seq", "base ms", "base again ×", "merged ×", "unmerged ×",
                      "AdapterH ×"],
               title=f"Forward pass on {device.type} ({clock} time; base: median ms, others: "
                     f"geometric mean of {args.rounds} paired rounds' ratios)",
               numeric_format="{:.3f}")
    result = {
        **provenance("merge_latency", device),
        "load_average_1_5_15min": {"start": [round(v, 2) for v in load_start],
                                   "end": [round(v, 2) for v in os.getloadavg()]},
        "duration_s": round(time.time() - t_start, 1),
        "settings": {"rounds": args.rounds, "warmup_rounds": 2, "clock": clock,
                     "order": "a seeded random permutation per round "
                              "(lora_edu.serving.round_orders, seeded by the "
                              "shape: zlib.crc32 of its name)",
                     "quick": args.quick,
                     "torch_threads": torch.get_num_threads(),
                     "calls_per_timing": repeat,
                     "per_round_ms": "milliseconds per forward pass: each timing runs "
                                     "calls_per_timing passes (the same for every version of "
                                     "a shape) and is divided by that count",
                     "statistic": "per version: geometric mean of the per-round ratios to the "
                                  "base with its 95 % CI; median and quartiles of the ratios "
                                  "as the spread (lora_edu.serving.round_ratio)",
                     "controls": "base_same: the base object timed under a second name; "
                                 "base_again, base_copy3: deep copies of the base",
                     "model": ("gpu preset" if device.type == "cuda" else
                               "cpu preset (d_model 128, 4 layers)"),
                     "lora": "r=8, alpha=16 on q and v", "adapter": "AdapterH, bottleneck 16"},
        "figures": figures,
        "paper_table1_ms": PAPER_MS,
        "paper_source": "Hu et al. (2022), LoRA, Table 1 (GPT-2 medium, Quadro RTX8000)",
    }
    write_result(result, "merge_latency", device, out=args.out)
    print(f"took {result['duration_s']:.0f} s; load average at start {load_start[0]:.2f}, "
          f"at end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
