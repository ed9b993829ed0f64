"""Inference latency of LoRA merged, unmerged and bottleneck adapters, in the shape of Table 1.

Usage: python benchmarks/merge_latency.py [--repeats N]

The small GPT (``cpu`` preset on a CPU, ``gpu`` preset on a GPU) runs one forward pass in five
versions: the base model, a second copy of the base (its difference from the first is the
noise floor), LoRA on W_q and W_v merged, the same LoRA unmerged, and Houlsby adapters after
the attention output and the MLP of every block ("AdapterH"). Shapes follow the LoRA paper's
Table 1 (batch × sequence 32×512, 16×256, 1×128 on a GPU; scaled down on a CPU). Versions are
timed round-robin, the fastest repeat kept; on a GPU the clock is elapsed time, on a CPU the
CPU time of one thread (PyTorch single-threaded), which other processes do not inflate.
Writes ``benchmarks/results/merge_latency-<device>.json`` with each version's milliseconds
and its ``*_over_base_ratio``, beside the paper's figures for reference.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
from torch import nn

from lora_edu.lora import LoraConfig, inject_lora, lora_layers, merge_lora
from lora_edu.models import GPT, gpt_config
from lora_edu.report import show_table
from lora_edu.repro import get_device, seed_all
from lora_edu.serving import BottleneckAdapter, add_bottleneck_adapters, interleaved_timings

from _provenance import provenance, write_result  # benchmarks/ is on sys.path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"cuda": [(32, 512), (16, 256), (1, 128)], "cpu": [(8, 128), (2, 64), (1, 16)]}
#: Hu et al. (2022), Table 1: GPT-2 medium, Quadro RTX8000, ms per forward pass.
PAPER_MS = {"32x512": {"fine-tuned or merged LoRA": 1449.4, "AdapterL": 1482.0,
                       "AdapterH": 1492.2},
            "16x256": {"fine-tuned or merged LoRA": 338.0, "AdapterL": 354.8,
                       "AdapterH": 366.3},
            "1x128": {"fine-tuned or merged LoRA": 19.8, "AdapterL": 23.9, "AdapterH": 25.8}}


def build_versions(device: torch.device, block: int) -> dict[str, nn.Module]:
    """The five versions of the GPT, with non-zero adapters (nothing is skipped)."""
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
    return {"base": base, "base_again": copy.deepcopy(base),
            "lora_merged": merge_lora(copy.deepcopy(unmerged)), "lora_unmerged": unmerged,
            "adapter_h": adapter}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    device = get_device()
    shapes = SHAPES["cuda" if device.type == "cuda" else "cpu"]
    clock = "wall" if device.type == "cuda" else "thread"
    versions = build_versions(device, max(t for _, t in shapes))
    figures, rows = {}, []
    with torch.inference_mode():
        for batch, seq in shapes:
            idx = torch.randint(0, 256, (batch, seq), device=device)
            times = interleaved_timings({n: (lambda m=m: m(idx)) for n, m in versions.items()},
                                        repeats=args.repeats, warmup=2, clock=clock)
            ms = {n: 1000 * min(t) for n, t in times.items()}
            entry = {f"{n}_ms": round(v, 4) for n, v in ms.items()}
            entry.update({f"{n}_over_base_ratio": round(ms[n] / ms["base"], 4)
                          for n in ms if n != "base"})
            figures[f"{batch}x{seq}"] = entry
            rows.append((batch, seq, ms["base"], *(ms[n] / ms["base"] for n in
                                                   ("base_again", "lora_merged",
                                                    "lora_unmerged", "adapter_h"))))
    show_table(rows, ["batch", "seq", "base ms", "base again ×", "merged ×", "unmerged ×",
                      "AdapterH ×"],
               title=f"Forward pass on {device.type} ({clock} time, fastest of {args.repeats})",
               numeric_format="{:.3f}")
    result = {
        **provenance("merge_latency", device),
        "settings": {"repeats": args.repeats, "clock": clock, "statistic": "fastest repeat",
                     "model": "gpu preset" if device.type == "cuda" else "cpu preset",
                     "lora": "r=8, alpha=16 on q and v", "adapter": "AdapterH, bottleneck 16"},
        "figures": figures,
        "paper_table1_ms": PAPER_MS,
        "paper_source": "Hu et al. (2022), LoRA, Table 1 (GPT-2 medium, Quadro RTX8000)",
    }
    write_result(result, "merge_latency", device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
