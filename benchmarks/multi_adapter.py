"""Serving many LoRA adapters in one batch: the segmented, gathered and looped paths against
PEFT's mixed batches and one adapter at a time, and a KV-cache decode loop on SmolLM2.

Usage: python benchmarks/multi_adapter.py [--rounds N] [--decode-rounds N] [--quick]
                                          [--skip-decode] [--out PATH]

Run it on an otherwise idle machine (the load average is recorded at the start and the end).
``--quick`` shrinks every part to check that the script runs (about a minute); its figures
mean nothing and it writes to ``/tmp`` unless ``--out`` says otherwise.

**The batched layer on the small GPT.** A batch of requests, each naming one of ``n`` adapters
(8, 32 and 128), runs through the small GPT whose ``q`` and ``v`` projections carry the
adapters (:class:`lora_edu.serving.MultiLoRALinear`). Adapter popularity is *uniform*
(round-robin in a seeded random order) or *Zipf*-skewed (adapter j drawn with probability ∝
1/(j+1)); the batch is sorted by adapter, as a server's scheduler arranges it. Two shapes:
*prefill* (a prompt of T tokens per request) and *decode* (one new token per request, no KV
cache: the forward pass of one step). Arms, timed in rounds of a fresh random order:

* ``base``: the model without adapters;
* ``auto``, ``segmented`` (SGMV-like), ``gathered`` (BGMV-like), ``loop``: the batched layer's
  paths (``auto`` picks one by :func:`lora_edu.serving.choose_path`);
* ``peft_mixed``: PEFT with the same adapters, called with ``adapter_names`` (its
  ``_mixed_batch_forward``: a masked sub-batch per adapter in every layer), the baseline a
  PEFT user has;
* ``merged_one_at_a_time``, ``swapped_one_at_a_time``: for each adapter, merge it (or make it
  the only active unmerged adapter) and run its requests as their own batch
  (:class:`lora_edu.serving.OneAdapterAtATime`). The faster (lower median time) is the
  one-at-a-time baseline;
* ``peft_bookkeeping``, ``loop_bookkeeping``: only the step that finds each adapter's rows, as
  PEFT's ``_mixed_batch_forward`` does it (a Python scan of the adapter names, then each list
  of rows turned into an index to read and to write) and as the ``loop`` path does it (a tensor
  comparison per adapter), once per adapted layer: what a forward pass spends on bookkeeping,
  to test whether it explains the gap between ``peft_mixed`` and ``loop``.

``auto_over_picked_path`` is an A/A control: ``auto`` runs exactly the path it picks (plus
:func:`lora_edu.serving.choose_path` per layer), so the two must come out indistinguishable.

**Decoding SmolLM2 with a KV cache.** ``requests`` prompts of one length, spread evenly over a
few adapters on every linear layer of SmolLM2-135M (``lora_edu.pretrained.load_smollm2``),
all arriving at time 0, are decoded greedily for ``new_tokens`` tokens with a KV cache
(:func:`lora_edu.serving.serve_decode`) by four servers: the base model (no adapters, the
floor); ``batched`` (one mixed batch through MultiLoRALinear); ``peft_mixed`` (one mixed batch
through PEFT's ``adapter_names``); ``merged_one_at_a_time`` (each adapter merged in turn, its
requests decoded to completion before the next adapter's start); and ``batched_again``, the
batched server timed a second time in every round, an A/A control whose ratio to
``batched`` measures the run's own resolution. Per request: time to first
token (TTFT, waiting included), time per output token after the first (TPOT) and end-to-end
latency; per server and round: their mean and p95 over the requests, and tokens per second;
across rounds (``mean_over_rounds``): the mean of each per-round figure with its 95 % t-interval.

**Statistics** (``../shared/EVIDENCE.md`` §5). Each round runs every arm once, back to back, in
a fresh random order (seeded, :func:`lora_edu.serving.round_orders`); a ratio is the
geometric mean of the per-round ratios with its own 95 % interval (paired over rounds;
:func:`lora_edu.serving.round_ratio`), whose median and quartiles are stored as their
spread. Every per-round figure is written too. On a GPU the clock is elapsed time; on a
CPU it is the CPU time of the one thread PyTorch runs on (``time.thread_time``), so a figure
measured on a CPU is a one-thread figure at the model's own (toy) width.

Also: a layer-level sweep that sets ``SEGMENT_MIN_RANK_ROWS`` (the threshold with the
smallest worst-case slowdown, :func:`lora_edu.serving.choose_threshold`, and the thresholds it
cannot tell from that one), mixed ranks (the gathered path
pads to r_max, the segmented one does not), and where adapters live (bytes per adapter,
host-to-device time at a stated PCIe bandwidth, LRU loads under Zipf traffic for an all-linear
adapter). Writes ``benchmarks/results/multi_adapter-<device>.json``.
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

from lora_edu.models import GPT, gpt_config
from lora_edu.report import show_table
from lora_edu.repro import get_device, seed_all
from lora_edu.serving import (
    SEGMENT_MIN_RANK_ROWS,
    MultiLoRALinear,
    OneAdapterAtATime,
    adapter_nbytes,
    choose_path,
    choose_threshold,
    interleaved_timings,
    lru_loads,
    multi_lora_gpt,
    peft_mixed_batch_model,
    random_adapters,
    rotating_rounds,
    round_ratio,
    serve_decode,
    set_adapter_ids,
)
from lora_edu.stats import mean_interval

ADAPTER_COUNTS = (8, 32, 128)
POPULARITY = ("uniform", "zipf")
ZIPF_EXPONENT = 1.0
MIXED_RANKS = (4, 8, 16, 32, 64)   # cycled over the adapters of the mixed-rank run
PATHS = ("auto", "segmented", "gathered", "loop")
SETTINGS = {  # requests per batch, prompt tokens per request, model preset, LoRA rank
    "cpu": {"requests": 128, "prefill_tokens": 16, "preset": "cpu", "r": 8},
    "cuda": {"requests": 256, "prefill_tokens": 128, "preset": "gpu", "r": 16},
}
#: The KV-cache decode on SmolLM2: requests (all at time 0), adapters (requests spread evenly),
#: prompt and generated tokens per request, LoRA rank, and the adapted layers (all linear).
DECODE = {
    "cpu": {"requests": 16, "adapters": 4, "prompt_tokens": 32, "new_tokens": 16, "r": 8},
    "cuda": {"requests": 64, "adapters": 8, "prompt_tokens": 128, "new_tokens": 64, "r": 16},
}
DECODE_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
QUICK = {"adapter_counts": (8,), "requests": 16, "prefill_tokens": 4, "sweep_requests": 8,
         "decode": {"requests": 4, "adapters": 2, "prompt_tokens": 4, "new_tokens": 3, "r": 4}}
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
#: The LRU simulation: one adapter = rank r on every linear layer ("all-linear") of the model.
CACHE = {"adapters": 1000, "requests_per_step": 32, "steps": 2000, "slots": (32, 64, 128, 256),
         "model": "Llama-3-8B", "r": 16, "targets": "all-linear"}


def clock(device: torch.device) -> str:
    """Elapsed time on a GPU; on a CPU, the CPU time of the one thread PyTorch runs on."""
    return "wall" if device.type == "cuda" else "thread"


def adapter_ids(n: int, requests: int, popularity: str, gen: torch.Generator) -> torch.Tensor:
    """One adapter per request, sorted by adapter (as a server's scheduler arranges a batch)."""
    if popularity == "uniform":
        ids = torch.randperm(requests, generator=gen) % n
    else:
        p = 1.0 / torch.arange(1, n + 1, dtype=torch.float64) ** ZIPF_EXPONENT
        ids = torch.multinomial(p, requests, replacement=True, generator=gen)
    return torch.sort(ids).values


def speed(faster: str, slower: str, times: dict[str, list[float]]) -> dict:
    """Speed ratio of arm ``faster`` over arm ``slower`` (= time of slower / time of faster),
    from paired rounds."""
    return round_ratio(times[slower], times[faster]).as_dict()


def peft_bookkeeping(names: list[str], layers: int) -> None:
    """What PEFT's ``LoraLayer._mixed_batch_forward`` (peft 0.21) does in every adapted layer to
    find each adapter's rows before any product: the set of names, one Python scan of the list
    per adapter, and each list of rows turned into an index twice (``x[rows]`` to read,
    ``result[rows] +=`` to write)."""
    for _ in range(layers):
        for a in set(names):
            rows = [i for i, item in enumerate(names) if item == a]
            torch.as_tensor(rows)
            torch.as_tensor(rows)


def loop_bookkeeping(ids: torch.Tensor, layers: int) -> None:
    """The same step in the package's ``loop`` path (``MultiLoRALinear._looped``), once per
    adapted layer: the adapters present, then one tensor comparison per adapter."""
    for _ in range(layers):
        for j in torch.unique(ids).tolist():
            (ids == j).nonzero().squeeze(1)


def measure(device: torch.device, cfg: dict, n_adapters: int, tokens: int, popularity: str,
            rounds: int, ranks: tuple[int, ...] | None = None) -> dict:
    """Every arm on one adapter count, shape and popularity: median tokens/s, per-round times,
    and the ratios the chapter reads."""
    seed_all(0)
    base = GPT(gpt_config(cfg["preset"])).to(device).eval()
    r = cfg["r"] if ranks is None else [ranks[i % len(ranks)] for i in range(n_adapters)]
    model = multi_lora_gpt(copy.deepcopy(base), n_adapters, r=r)
    gen = torch.Generator().manual_seed(n_adapters)
    ids = adapter_ids(n_adapters, cfg["requests"], popularity, gen).to(device)
    idx = torch.randint(0, 256, (cfg["requests"], tokens), generator=gen).to(device)
    one = OneAdapterAtATime(base, model)
    layer = next(m for m in model.modules() if isinstance(m, MultiLoRALinear))
    peft_model = peft_mixed_batch_model(base, model) if ranks is None else None
    names = [layer.names[j] for j in ids.tolist()]
    n_layers = sum(isinstance(m, MultiLoRALinear) for m in model.modules())

    def path(mode: str):
        def call() -> None:
            set_adapter_ids(model, ids, mode=mode)
            model(idx)
        return call

    calls = {"base": lambda: base(idx), **{m: path(m) for m in PATHS},
             "merged_one_at_a_time": lambda: one.merged(idx, ids),
             "swapped_one_at_a_time": lambda: one.swapped(idx, ids)}
    if peft_model is not None:  # PEFT gives an adapter one rank: not in the mixed-rank run
        calls["peft_mixed"] = lambda: peft_model(idx, adapter_names=names)
        calls["peft_bookkeeping"] = lambda: peft_bookkeeping(names, n_layers)
        calls["loop_bookkeeping"] = lambda: loop_bookkeeping(ids, n_layers)
    with torch.inference_mode():
        # each configuration draws its own round orders, so an order effect does not repeat
        times = interleaved_timings(calls, repeats=rounds, warmup=2, clock=clock(device),
                                    seed=zlib.crc32(f"{n_adapters}-{tokens}-{popularity}-"
                                                    f"{ranks}".encode()))
    median = {k: statistics.median(v) for k, v in times.items()}
    one_name = min(("merged_one_at_a_time", "swapped_one_at_a_time"), key=median.get)
    present = int(torch.unique(ids).numel())
    r_max = max(layer.ranks[j] for j in torch.unique(ids).tolist())
    picked = choose_path(len(ids), present, r_max)
    ratios = {"auto_over_picked_path": speed("auto", picked, times),   # A/A control
              "auto_over_one_at_a_time": speed("auto", one_name, times),
              "auto_over_loop": speed("auto", "loop", times),
              "segmented_over_gathered": speed("segmented", "gathered", times),
              "base_over_auto": speed("base", "auto", times)}
    if peft_model is not None:
        ratios["auto_over_peft_mixed"] = speed("auto", "peft_mixed", times)
        ratios["peft_mixed_over_one_at_a_time"] = speed("peft_mixed", one_name, times)
    return {"adapters_in_batch": present,
            "auto_path": picked, "adapted_layers": n_layers,
            "padding_fraction_gathered": round(layer.padding_fraction(ids), 4),
            "tokens": idx.numel(),
            **{f"{k}_tokens_per_s": round(idx.numel() / v, 1) for k, v in median.items()},
            "one_at_a_time_baseline": one_name,
            "speed_ratios": ratios,
            "times_s": {k: [round(t, 7) for t in v] for k, v in times.items()}}


def layer_sweep(device: torch.device, cfg: dict, rounds: int) -> dict:
    """One MultiLoRALinear: gathered against segmented over the number of adapters in a batch,
    for two shapes and two ranks, and the threshold on rank rows per adapter present
    (requests · r_max / adapters present, where auto switches to segmented) with the smallest
    worst-case slowdown against the faster path (slowdowns from the geometric mean of the
    per-round ratios; :func:`lora_edu.serving.choose_threshold`), and the thresholds this
    sweep cannot tell from it."""
    d = gpt_config(cfg["preset"]).d_model
    n_req = cfg["sweep_requests"]
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
                                        repeats=rounds, warmup=2, clock=clock(device),
                                        seed=zlib.crc32(f"{tokens}-{r}-{n}".encode()))
            seg = round_ratio(t["segmented"], t["gathered"])
            rows.append({"tokens": tokens, "r": r, "adapters": n,
                         "requests_per_adapter": n_req // n,
                         "rank_rows_per_adapter": n_req * r // n,
                         **{f"{m}_us": round(1e6 * statistics.median(v), 2)
                            for m, v in t.items()},
                         "segmented_over_gathered_time": seg.as_dict()})
    choice = choose_threshold(rows, [2 ** i for i in range((n_req * max(ranks)).bit_length())])
    return {"d": d, "k": d, "ranks": ranks, "requests": n_req, "rounds": rounds, "rows": rows,
            "worst_slowdown_by_threshold": {m: round(w[0], 4)
                                            for m, w in choice["worst"].items()},
            "worst_slowdown_interval_by_threshold": {m: [round(w[1], 4), round(w[2], 4)]
                                                     for m, w in choice["worst"].items()},
            "best_threshold": choice["best"], "tied_with_best": choice["tied"],
            "statistic": "geometric mean over paired rounds of the per-round time ratio "
                         "segmented/gathered with its 95 % CI; worst slowdown of a threshold "
                         "from the geometric means, its interval from the rows' CI ends "
                         "(lora_edu.serving.choose_threshold); *_us: median microseconds per "
                         "layer call"}


def decode_latency(device: torch.device, dcfg: dict, rounds: int) -> dict:
    """Greedy decoding with a KV cache on SmolLM2, four servers and an A/A twin of ours
    (``batched_again``: the same server timed again) in rounds of a fresh random order."""
    from lora_edu.pretrained import load_smollm2

    seed_all(0)
    base, _ = load_smollm2(device=device)
    n, a = dcfg["requests"], dcfg["adapters"]
    multi = multi_lora_gpt(copy.deepcopy(base), a, r=dcfg["r"], targets=DECODE_TARGETS)
    peft_model = peft_mixed_batch_model(base, multi)
    one = OneAdapterAtATime(base, multi)
    names = next(m for m in multi.modules() if isinstance(m, MultiLoRALinear)).names
    ids = (torch.arange(n) % a).sort().values.to(device)            # evenly, sorted
    gen = torch.Generator().manual_seed(1)
    idx = torch.randint(0, base.config.vocab_size, (n, dcfg["prompt_tokens"]),
                        generator=gen).to(device)
    G, clk, every = dcfg["new_tokens"], clock(device), torch.arange(n, device=device)
    groups = [(torch.nonzero(ids == j).squeeze(1), lambda j=j: one.merge_adapter(j))
              for j in range(a)]
    arms = {
        "base": lambda: serve_decode([(every, lambda: None)], base, idx, G, clk),
        "batched": lambda: serve_decode([(every, lambda: set_adapter_ids(multi, ids))],
                                        multi, idx, G, clk),
        # A/A control: the same server again, so the run's own resolution is measured
        "batched_again": lambda: serve_decode([(every, lambda: set_adapter_ids(multi, ids))],
                                              multi, idx, G, clk),
        "peft_mixed": lambda: serve_decode(
            [(every, lambda: {"adapter_names": [names[j] for j in ids.tolist()]})],
            peft_model, idx, G, clk),
        "merged_one_at_a_time": lambda: serve_decode(groups, one.base, idx, G, clk),
    }
    with torch.inference_mode():
        results = rotating_rounds(arms, rounds=rounds, warmup=1)
    metrics = ("ttft_mean", "ttft_p95", "tpot_mean", "tpot_p95", "e2e_mean", "e2e_p95",
               "tokens_per_s")
    per_round = {arm: {m: [round(r.summary()[m], 6) for r in res] for m in metrics}
                 for arm, res in results.items()}
    ref = results["batched"][0].tokens
    agree = {arm: round(float((res[0].tokens == ref).float().mean()), 4)
             for arm, res in results.items() if arm != "base"}
    ratios = {}
    for arm in ("base", "batched_again", "peft_mixed", "merged_one_at_a_time"):
        ratios[arm] = {m: round_ratio(per_round[arm][m], per_round["batched"][m]).as_dict()
                       for m in metrics}
    mean_over_rounds = {arm: {m: [round(v, 6) for v in (i.estimate, i.low, i.high)]
                              for m, i in ((m, mean_interval(v)) for m, v in d.items())}
                        for arm, d in per_round.items()}
    return {"settings": {**dcfg, "targets": list(DECODE_TARGETS), "clock": clk,
                         "adapter_names": list(names), "arrivals": "all requests at time 0",
                         "one_at_a_time": "each adapter's requests decoded to completion "
                                          "before the next adapter's start"},
            "mean_over_rounds": mean_over_rounds,
            "ratio_to_batched": ratios,
            "per_round": per_round,
            "tokens_agree_with_batched": agree,
            "statistic": "per round: mean and p95 over the requests; across rounds: the mean "
                         "of each per-round figure and its 95 % t-interval ([mean, low, "
                         "high]); ratio_to_batched: round_ratio of each arm to 'batched', "
                         "geometric mean with its 95 % CI (>1: larger than batched)"}


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
    targets = list(m["shapes"]) if CACHE["targets"] == "all-linear" else CACHE["targets"]
    per_adapter = adapter_nbytes([m["shapes"][t] for t in targets] * m["layers"],
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
    size_key = f"{CACHE['model']}_{CACHE['targets']}_r{CACHE['r']}"
    assert sizes[size_key]["bytes_fp16"] == per_adapter  # the table and the cache agree
    return {"pcie_gb_per_s": PCIE_GB_PER_S, "models": MODELS, "sizes": sizes,
            "cache": {**{k: v for k, v in CACHE.items() if k != "slots"},
                      "size_key": size_key, "target_modules": targets,
                      "zipf_exponent": ZIPF_EXPONENT, "bytes_per_adapter": per_adapter,
                      "mean_distinct_adapters_per_step": round(sum(distinct) / len(distinct),
                                                               2),
                      "by_slots": cache}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15,
                        help="paired rounds per configuration of the small GPT (default 15)")
    parser.add_argument("--decode-rounds", type=int, default=10,
                        help="paired rounds of the SmolLM2 decode (default 10)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny settings, to check that the script runs (figures meaningless)")
    parser.add_argument("--skip-decode", action="store_true", help="leave out the SmolLM2 part")
    parser.add_argument("--out", type=Path, default=None, help="result file (default: "
                        "benchmarks/results/multi_adapter-<device>.json; /tmp with --quick)")
    args = parser.parse_args()
    device = get_device()
    if device.type == "cpu":
        torch.set_num_threads(1)
    load_start, t_start = os.getloadavg(), time.time()
    key = "cuda" if device.type == "cuda" else "cpu"
    cfg = {**SETTINGS[key], "sweep_requests": SETTINGS[key]["requests"]}
    dcfg, counts = dict(DECODE[key]), ADAPTER_COUNTS
    if args.quick:
        cfg.update({k: QUICK[k] for k in ("requests", "prefill_tokens", "sweep_requests")})
        dcfg, counts = dict(QUICK["decode"]), QUICK["adapter_counts"]
        args.rounds, args.decode_rounds = 2, 2
    shapes = {"prefill": cfg["prefill_tokens"], "decode": 1}
    sweep = layer_sweep(device, cfg, max(args.rounds, 15) if not args.quick else 2)
    print(f"layer sweep: best threshold = {sweep['best_threshold']} rank rows per adapter "
          f"(the package uses {SEGMENT_MIN_RANK_ROWS})")
    figures: dict[str, dict] = {}
    rows = []
    for popularity in POPULARITY:
        for shape, tokens in shapes.items():
            for n in counts:
                f = measure(device, cfg, n, tokens, popularity, args.rounds)
                key_ = f"{shape}_{n}_adapters" + ("" if popularity == "uniform" else "_zipf")
                figures[key_] = f
                s = f["speed_ratios"]
                rows.append((popularity, shape, n, f["adapters_in_batch"], f["auto_path"],
                             s["auto_over_picked_path"]["geomean"],
                             s["auto_over_loop"]["geomean"],
                             s["auto_over_peft_mixed"]["geomean"],
                             s["auto_over_one_at_a_time"]["geomean"]))
    for shape, tokens in shapes.items():
        n = 32 if not args.quick else counts[0]
        f = measure(device, cfg, n, tokens, "uniform", args.rounds, ranks=MIXED_RANKS)
        figures[f"{shape}_{n}_adapters_mixed_ranks"] = f
        s = f["speed_ratios"]
        rows.append(("uniform, mixed r", shape, n, f["adapters_in_batch"], f["auto_path"],
                     s["auto_over_picked_path"]["geomean"], s["auto_over_loop"]["geomean"],
                     float("nan"), s["auto_over_one_at_a_time"]["geomean"]))
    show_table(rows, ["popularity", "shape", "adapters", "in batch", "auto picks",
                      "auto/picked (A/A)", "auto/loop", "auto/PEFT", "auto/one-at-a-time"],
               title=f"Speed ratios (geometric mean of paired rounds), {cfg['requests']} "
                     f"requests on "
                     f"{device.type}, {cfg['preset']} GPT, r={cfg['r']} on q and v",
               numeric_format="{:,.3g}")
    decode = None
    if not args.skip_decode:
        decode = decode_latency(device, dcfg, args.decode_rounds)
        mor = decode["mean_over_rounds"]
        show_table([(arm, m["ttft_mean"][0] * 1e3, m["ttft_p95"][0] * 1e3,
                     m["tpot_mean"][0] * 1e3, m["tpot_p95"][0] * 1e3, m["tokens_per_s"][0])
                    for arm, m in mor.items()],
                   ["server", "TTFT mean ms", "TTFT p95 ms", "TPOT mean ms", "TPOT p95 ms",
                    "tokens/s"],
                   title=f"SmolLM2 KV-cache decode, {dcfg['requests']} requests, "
                         f"{dcfg['adapters']} adapters (mean of {args.decode_rounds} rounds)",
                   numeric_format="{:,.4g}")
    result = {
        **provenance("multi_adapter", device),
        "load_average_1_5_15min": {"start": [round(v, 2) for v in load_start],
                                   "end": [round(v, 2) for v in os.getloadavg()]},
        "duration_s": None,
        "settings": {**cfg, "shapes_tokens_per_request": shapes, "rounds": args.rounds,
                     "decode_rounds": args.decode_rounds, "quick": args.quick,
                     "popularity": {"uniform": "round-robin over a seeded random order",
                                    "zipf": f"p(j) ∝ 1/(j+1)^{ZIPF_EXPONENT}"},
                     "mixed_ranks": MIXED_RANKS, "segment_min_rank_rows": SEGMENT_MIN_RANK_ROWS,
                     "batch_order": "sorted by adapter",
                     "round_order": "a seeded random permutation per round "
                                    "(lora_edu.serving.round_orders), seeded by the "
                                    "configuration: zlib.crc32 of its name",
                     "statistic": "tokens/s from the median time over paired rounds; "
                                  "speed_ratios: geometric mean of the per-round ratios with "
                                  "its 95 % CI, and their median and quartiles as the spread "
                                  "(lora_edu.serving.round_ratio)",
                     "bookkeeping_arms": "peft_bookkeeping / loop_bookkeeping: only the "
                                         "row-finding step of PEFT's _mixed_batch_forward "
                                         "(peft 0.21) / of the loop path, once per adapted "
                                         "layer",
                     "clock": clock(device) + (" (time.thread_time, torch on 1 thread)"
                                               if clock(device) == "thread" else "")},
        "figures": figures,
        "layer_sweep": sweep,
        "decode_kv_cache": decode,
        "where_adapters_live": where_adapters_live(),
    }
    result["duration_s"] = round(time.time() - t_start, 1)
    out = args.out or (Path("/tmp/multi_adapter-quick.json") if args.quick else None)
    write_result(result, "multi_adapter", device, out=out)
    print(f"took {result['duration_s']:.0f} s; load average at start {load_start[0]:.2f}, "
          f"at end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
