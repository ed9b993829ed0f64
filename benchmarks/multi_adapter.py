"""Serving many LoRA adapters in one batch: gathered factors (bmm) against one adapter at a time.

Usage: python benchmarks/multi_adapter.py [--repeats N]

A batch of requests, each naming one of ``n`` adapters (8, 32 and 128; assigned round-robin
in a seeded random order, so that every adapter has requests), runs through the small GPT
whose ``q`` and ``v`` projections carry the adapters (:class:`lora_edu.serving.MultiLoRALinear`). Two shapes: *prefill* (each request brings a
prompt of T tokens) and *decode* (one new token per request, the step that dominates
serving). For each, the base model alone, the batched LoRA branch and the looped LoRA branch
are timed round-robin in one run; figures are forward-pass tokens per second from the fastest
of the repeats (other processes can only add time, so the minimum estimates the cost itself).
On a GPU the clock is elapsed time; on a CPU it is the CPU time of one thread running PyTorch
single-threaded, which other processes sharing the machine do not inflate. Writes
``benchmarks/results/multi_adapter-<device>.json``.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch

from lora_edu.models import GPT, gpt_config
from lora_edu.report import show_table
from lora_edu.repro import get_device, seed_all
from lora_edu.serving import interleaved_timings, multi_lora_gpt, set_adapter_ids

from _provenance import provenance, write_result  # benchmarks/ is on sys.path

ROOT = Path(__file__).resolve().parents[1]
ADAPTER_COUNTS = (8, 32, 128)
SETTINGS = {  # requests per batch, prompt tokens per request, model preset, LoRA rank
    "cpu": {"requests": 128, "prefill_tokens": 16, "preset": "cpu", "r": 8},
    "cuda": {"requests": 256, "prefill_tokens": 128, "preset": "gpu", "r": 16},
}


def clock(device: torch.device) -> str:
    """Elapsed time on a GPU; on a (possibly shared) CPU, one thread's CPU time."""
    return "wall" if device.type == "cuda" else "thread"


def measure(device: torch.device, n_adapters: int, tokens: int, repeats: int) -> dict[str, float]:
    """Tokens/s of base, batched and looped forward passes for one adapter count and shape."""
    cfg = SETTINGS[device.type if device.type in SETTINGS else "cpu"]
    seed_all(0)
    base = GPT(gpt_config(cfg["preset"])).to(device).eval()
    model = multi_lora_gpt(copy.deepcopy(base), n_adapters, r=cfg["r"])
    gen = torch.Generator().manual_seed(n_adapters)
    ids = torch.randperm(cfg["requests"], generator=gen) % n_adapters
    idx = torch.randint(0, 256, (cfg["requests"], tokens), generator=gen).to(device)

    def run(mode: str):
        def call() -> None:
            set_adapter_ids(model, ids, mode=mode)
            model(idx)
        return call

    with torch.inference_mode():
        times = interleaved_timings({"base": lambda: base(idx), "batched": run("batched"),
                                     "looped": run("loop")}, repeats=repeats,
                                    clock=clock(device))
    n_tok = idx.numel()
    tps = {k: n_tok / min(v) for k, v in times.items()}
    return {"adapters_in_batch": int(torch.unique(ids).numel()),
            "base_tokens_per_s": tps["base"], "batched_tokens_per_s": tps["batched"],
            "looped_tokens_per_s": tps["looped"],
            "batched_over_looped_ratio": tps["batched"] / tps["looped"],
            "base_over_batched_ratio": tps["base"] / tps["batched"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    device = get_device()
    cfg = SETTINGS[device.type if device.type in SETTINGS else "cpu"]
    shapes = {"prefill": cfg["prefill_tokens"], "decode": 1}
    figures: dict[str, dict[str, float]] = {}
    rows = []
    for shape, tokens in shapes.items():
        for n in ADAPTER_COUNTS:
            f = measure(device, n, tokens, args.repeats)
            figures[f"{shape}_{n}_adapters"] = {k: round(v, 4) if isinstance(v, float) else v
                                                for k, v in f.items()}
            rows.append((shape, n, f["adapters_in_batch"], f["base_tokens_per_s"],
                         f["batched_tokens_per_s"], f["looped_tokens_per_s"],
                         f["batched_over_looped_ratio"]))
    show_table(rows, ["shape", "adapters", "distinct in batch", "base tok/s", "batched tok/s",
                      "looped tok/s", "batched/looped"],
               title=f"{cfg['requests']} requests per batch on {device.type}, "
                     f"{cfg['preset']} GPT, r={cfg['r']} on q and v", numeric_format="{:,.3g}")
    result = {
        **provenance("multi_adapter", device),
        "settings": {**cfg, "shapes_tokens_per_request": shapes, "repeats": args.repeats,
                     "statistic": "tokens/s of a forward pass from the fastest of the "
                                  "interleaved repeats",
                     "clock": clock(device) + (" (time.thread_time, torch on 1 thread)"
                                               if clock(device) == "thread" else "")},
        "figures": figures,
    }
    write_result(result, "multi_adapter", device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
