"""Serving many LoRA adapters in one batch: the segmented, gathered and looped paths against
one adapter at a time.

Usage: python benchmarks/multi_adapter.py [--repeats N]

A batch of requests, each naming one of ``n`` adapters (8, 32 and 128), runs through the small
GPT whose ``q`` and ``v`` projections carry the adapters
(:class:`lora_edu.serving.MultiLoRALinear`). Adapter popularity is *uniform* (round-robin in a
seeded random order: every adapter has requests) or *Zipf*-skewed (adapter j drawn with
probability ∝ 1/(j+1)); the batch is sorted by adapter, as a server's scheduler arranges it.
Two shapes: *prefill* (each request brings a prompt of T tokens) and *decode* (one new token
per request). For each, timed round-robin in one run:

* ``base``: the model without adapters;
* ``auto``, ``segmented`` (SGMV-like), ``gathered`` (BGMV-like), ``loop``: the batched layer's
  paths (``auto`` picks one by :func:`lora_edu.serving.choose_path`);
* ``merged_one_at_a_time``, ``swapped_one_at_a_time``: the baseline a user would otherwise
  pick (:class:`lora_edu.serving.OneAdapterAtATime`): for each adapter, merge it (or make it
  the active unmerged adapter) and run its requests as their own batch. The baseline's figure
  is the faster of the two.

Figures are forward-pass tokens per second from the fastest of the repeats (other processes
can only add time, so the minimum estimates the cost itself); each ratio also comes with its
range over the rounds (every round times all candidates back to back, so a round's ratio
compares like with like). On a GPU the clock is elapsed time; on a CPU it is the CPU time of
one thread running PyTorch single-threaded, which other processes sharing the machine do not
inflate. Also: a layer-level sweep that sets ``SEGMENT_MIN_REQUESTS``, mixed ranks (the
gathered path pads to r_max, the segmented one does not), and where adapters live (bytes per
adapter, host-to-device transfer time at a stated PCIe bandwidth, and LRU cache loads under
Zipf traffic). Writes ``benchmarks/results/multi_adapter-<device>.json``.
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch
from torch import nn

from lora_edu.models import GPT, gpt_config
from lora_edu.report import show_table
from lora_edu.repro import get_device, seed_all
from lora_edu.serving import (SEGMENT_MIN_RANK_ROWS, MultiLoRALinear, OneAdapterAtATime,
                              adapter_nbytes, choose_path, interleaved_timings, lru_loads,
                              multi_lora_gpt, random_adapters, set_adapter_ids)

from _provenance import provenance, write_result  # benchmarks/ is on sys.path

ADAPTER_COUNTS = (8, 32, 128)
POPULARITY = ("uniform", "zipf")
ZIPF_EXPONENT = 1.0
MIXED_RANKS = (4, 8, 16, 32, 64)   # cycled over the adapters of the mixed-rank run
PATHS = ("auto", "segmented", "gathered", "loop")
SETTINGS = {  # requests per batch, prompt tokens per request, model preset, LoRA rank
    "cpu": {"requests": 128, "prefill_tokens": 16, "preset": "cpu", "r": 8},
    "cuda": {"requests": 256, "prefill_tokens": 128, "preset": "gpu", "r": 16},
}
#: Where adapters live: layer shapes (d, k) of two real models, per transformer block.
MODELS = {
    "SmolLM2-135M": {"layers": 30, "shapes": {"q": (576, 576), "k": (192, 576),
                                              "v": (192, 576), "o": (576, 576),
                                              "gate": (1536, 576), "up": (1536, 576),
                                              "down": (576, 1536)}},
    "Llama-3-8B": {"layers": 32, "shapes": {"q": (4096, 4096), "k": (1024, 4096),
                                            "v": (1024, 4096), "o": (4096, 4096),
                                            "gate": (14336, 4096), "up": (14336, 4096),
                                            "down": (4096, 14336)}},
}
PCIE_GB_PER_S = 25.0  # host → device, a typical measured rate of PCIe 4.0 x16 (31.5 GB/s peak)
CACHE = {"adapters": 1000, "requests_per_step": 32, "steps": 2000, "slots": (32, 64, 128, 256),
         "model": "Llama-3-8B", "r": 16, "targets": ("q", "k", "v", "o")}


def clock(device: torch.device) -> str:
    """Elapsed time on a GPU; on a (possibly shared) CPU, one thread's CPU time."""
    return "wall" if device.type == "cuda" else "thread"


def adapter_ids(n: int, requests: int, popularity: str, gen: torch.Generator) -> torch.Tensor:
    """One adapter per request, sorted by adapter (as a server's scheduler arranges a batch)."""
    if popularity == "uniform":
        ids = torch.randperm(requests, generator=gen) % n
    else:
        p = 1.0 / torch.arange(1, n + 1, dtype=torch.float64) ** ZIPF_EXPONENT
        ids = torch.multinomial(p, requests, replacement=True, generator=gen)
    return torch.sort(ids).values


def ratio_range(num: list[float], den: list[float]) -> dict[str, float]:
    """Per-round ratios den[i]/num[i] of times (so: a speed ratio): min, median, max."""
    r = [d / n for n, d in zip(num, den)]
    return {"min": round(min(r), 4), "median": round(statistics.median(r), 4),
            "max": round(max(r), 4)}


def measure(device: torch.device, n_adapters: int, tokens: int, popularity: str, repeats: int,
            ranks: int | tuple[int, ...] | None = None) -> dict:
    """Tokens/s of every candidate for one adapter count, shape and popularity."""
    cfg = SETTINGS[device.type if device.type in SETTINGS else "cpu"]
    seed_all(0)
    base = GPT(gpt_config(cfg["preset"])).to(device).eval()
    r = cfg["r"] if ranks is None else [ranks[i % len(ranks)] for i in range(n_adapters)]
    model = multi_lora_gpt(copy.deepcopy(base), n_adapters, r=r)
    gen = torch.Generator().manual_seed(n_adapters)
    ids = adapter_ids(n_adapters, cfg["requests"], popularity, gen).to(device)
    idx = torch.randint(0, 256, (cfg["requests"], tokens), generator=gen).to(device)
    one = OneAdapterAtATime(base, model)

    def path(mode: str):
        def call() -> None:
            set_adapter_ids(model, ids, mode=mode)
            model(idx)
        return call

    calls = {"base": lambda: base(idx), **{m: path(m) for m in PATHS},
             "merged_one_at_a_time": lambda: one.merged(idx, ids),
             "swapped_one_at_a_time": lambda: one.swapped(idx, ids)}
    with torch.inference_mode():
        times = interleaved_timings(calls, repeats=repeats, warmup=2, clock=clock(device))
    n_tok = idx.numel()
    tps = {k: n_tok / min(v) for k, v in times.items()}
    one_name = max(("merged_one_at_a_time", "swapped_one_at_a_time"), key=tps.get)
    present = int(torch.unique(ids).numel())
    layer = next(m for m in model.modules() if isinstance(m, MultiLoRALinear))
    padding = layer.padding_fraction(ids)
    r_max = max(layer.ranks[j] for j in torch.unique(ids).tolist())
    out = {"adapters_in_batch": present,
           "auto_path": choose_path(len(ids), present, r_max),
           "padding_fraction_gathered": round(padding, 4),
           **{f"{k}_tokens_per_s": round(v, 1) for k, v in tps.items()},
           "one_at_a_time_baseline": one_name,
           "batched_over_one_at_a_time_ratio": round(tps["auto"] / tps[one_name], 4),
           "batched_over_one_at_a_time_per_round": ratio_range(times["auto"], times[one_name]),
           "auto_over_loop_ratio": round(tps["auto"] / tps["loop"], 4),
           "auto_over_loop_per_round": ratio_range(times["auto"], times["loop"]),
           "segmented_over_gathered_ratio": round(tps["segmented"] / tps["gathered"], 4),
           "base_over_auto_ratio": round(tps["base"] / tps["auto"], 4)}
    return out


def layer_sweep(device: torch.device, repeats: int) -> dict:
    """One MultiLoRALinear: gathered against segmented over the number of adapters in a batch,
    for two shapes and two ranks, and the threshold on rank rows per adapter present
    (requests · r_max / adapters present, where auto switches to segmented) with the smallest
    worst-case slowdown against the faster path."""
    cfg = SETTINGS[device.type if device.type in SETTINGS else "cpu"]
    d = gpt_config(cfg["preset"]).d_model
    n_req = cfg["requests"]
    gen = torch.Generator().manual_seed(0)
    rows = []
    ranks = (cfg["r"], 8 * cfg["r"])
    for tokens, r in [(t, r) for t in (1, cfg["prefill_tokens"]) for r in ranks]:
        for n in [2 ** i for i in range(n_req.bit_length()) if 2 ** i <= n_req]:
            layer = MultiLoRALinear(nn.Linear(d, d),
                                    random_adapters(d, d, n, r, gen)).to(device)
            ids = torch.sort(torch.randperm(n_req, generator=gen) % n).values.to(device)
            x = torch.randn(n_req, tokens, d, generator=gen).to(device)
            layer.set_ids(ids)

            def run(mode: str, layer=layer, x=x):
                def call() -> None:
                    layer.mode = mode
                    layer(x)
                return call
            with torch.inference_mode():
                t = interleaved_timings({m: run(m) for m in ("gathered", "segmented", "loop")},
                                        repeats=repeats, warmup=2, clock=clock(device))
            rows.append({"tokens": tokens, "r": r, "adapters": n,
                         "requests_per_adapter": n_req // n,
                         "rank_rows_per_adapter": n_req * r // n,
                         **{f"{m}_us": round(1e6 * min(v), 1) for m, v in t.items()}})
    regret = {}
    for m in [2 ** i for i in range((n_req * max(ranks)).bit_length())]:
        worst = 0.0
        for row in rows:
            pick = "segmented" if row["rank_rows_per_adapter"] >= m else "gathered"
            best = min(row["gathered_us"], row["segmented_us"])
            worst = max(worst, row[f"{pick}_us"] / best - 1)
        regret[m] = round(worst, 4)
    best_m = min(regret, key=lambda m: (regret[m], m))
    return {"d": d, "k": d, "ranks": ranks, "requests": n_req, "rows": rows,
            "worst_slowdown_by_threshold": regret, "best_threshold": best_m,
            "statistic": "microseconds per layer call, fastest of the interleaved repeats"}


def where_adapters_live() -> dict:
    """Bytes per adapter, transfer time over PCIe, and LRU loads per step under Zipf traffic."""
    sizes = {}
    for name, m in MODELS.items():
        for targets in (("q", "v"), tuple(m["shapes"])):
            for r in (8, 16, 64):
                shapes = [m["shapes"][t] for t in targets] * m["layers"]
                b = adapter_nbytes(shapes, r, bytes_per_number=2)
                base_bytes = sum(d * k for d, k in [m["shapes"][t] for t in m["shapes"]]) \
                    * m["layers"] * 2
                key = f"{name}_{'qv' if len(targets) == 2 else 'all-linear'}_r{r}"
                sizes[key] = {"bytes_fp16": b, "transfer_ms": round(1e3 * b / 1e9
                                                                    / PCIE_GB_PER_S, 4),
                              "fraction_of_adapted_base_weights": round(b / base_bytes, 6)}
    gen = torch.Generator().manual_seed(0)
    p = 1.0 / torch.arange(1, CACHE["adapters"] + 1, dtype=torch.float64) ** ZIPF_EXPONENT
    draws = torch.multinomial(p, CACHE["steps"] * CACHE["requests_per_step"], replacement=True,
                              generator=gen).view(CACHE["steps"], -1).tolist()
    m = MODELS[CACHE["model"]]
    per_adapter = adapter_nbytes([m["shapes"][t] for t in CACHE["targets"]] * m["layers"],
                                 CACHE["r"], bytes_per_number=2)
    cache = {}
    for slots in CACHE["slots"]:
        loads = lru_loads([[str(a) for a in step] for step in draws], slots)
        warm = loads[len(loads) // 10:]  # skip the cold start
        mean = sum(warm) / len(warm)
        cache[str(slots)] = {"mean_loads_per_step": round(mean, 3),
                             "mean_transfer_ms_per_step": round(
                                 1e3 * mean * per_adapter / 1e9 / PCIE_GB_PER_S, 4),
                             "device_bytes": slots * per_adapter}
    distinct = [len(set(s)) for s in draws]
    return {"pcie_gb_per_s": PCIE_GB_PER_S, "models": MODELS, "sizes": sizes,
            "cache": {**{k: v for k, v in CACHE.items() if k != "slots"},
                      "zipf_exponent": ZIPF_EXPONENT, "bytes_per_adapter": per_adapter,
                      "mean_distinct_adapters_per_step": round(sum(distinct) / len(distinct),
                                                               2),
                      "by_slots": cache}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    device = get_device()
    if device.type == "cpu":
        torch.set_num_threads(1)
    cfg = SETTINGS[device.type if device.type in SETTINGS else "cpu"]
    shapes = {"prefill": cfg["prefill_tokens"], "decode": 1}
    sweep = layer_sweep(device, max(args.repeats, 15))
    print(f"layer sweep: best threshold = {sweep['best_threshold']} rank rows per adapter "
          f"(the package uses {SEGMENT_MIN_RANK_ROWS})")
    figures: dict[str, dict] = {}
    rows = []
    for popularity in POPULARITY:
        for shape, tokens in shapes.items():
            for n in ADAPTER_COUNTS:
                f = measure(device, n, tokens, popularity, args.repeats)
                key = f"{shape}_{n}_adapters" + ("" if popularity == "uniform" else "_zipf")
                figures[key] = f
                rows.append((popularity, shape, n, f["adapters_in_batch"], f["auto_path"],
                             f["auto_over_loop_ratio"], f["segmented_over_gathered_ratio"],
                             f["batched_over_one_at_a_time_ratio"]))
    for shape, tokens in shapes.items():
        f = measure(device, 32, tokens, "uniform", args.repeats, ranks=MIXED_RANKS)
        figures[f"{shape}_32_adapters_mixed_ranks"] = f
        rows.append(("uniform, mixed r", shape, 32, f["adapters_in_batch"], f["auto_path"],
                     f["auto_over_loop_ratio"], f["segmented_over_gathered_ratio"],
                     f["batched_over_one_at_a_time_ratio"]))
    show_table(rows, ["popularity", "shape", "adapters", "in batch", "auto picks",
                      "auto/loop", "segm./gath.", "batched/one-at-a-time"],
               title=f"{cfg['requests']} requests per batch on {device.type}, "
                     f"{cfg['preset']} GPT, r={cfg['r']} on q and v", numeric_format="{:,.3g}")
    result = {
        **provenance("multi_adapter", device),
        "settings": {**cfg, "shapes_tokens_per_request": shapes, "repeats": args.repeats,
                     "popularity": {"uniform": "round-robin over a seeded random order",
                                    "zipf": f"p(j) ∝ 1/(j+1)^{ZIPF_EXPONENT}"},
                     "mixed_ranks": MIXED_RANKS, "segment_min_rank_rows": SEGMENT_MIN_RANK_ROWS,
                     "batch_order": "sorted by adapter",
                     "statistic": "tokens/s of a forward pass from the fastest of the "
                                  "interleaved repeats; *_per_round: the ratio in each round",
                     "clock": clock(device) + (" (time.thread_time, torch on 1 thread)"
                                               if clock(device) == "thread" else "")},
        "figures": figures,
        "layer_sweep": sweep,
        "where_adapters_live": where_adapters_live(),
    }
    write_result(result, "multi_adapter", device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
