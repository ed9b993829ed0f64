"""LoRA against full fine-tuning on the real model, one training step side by side: the
memory ledger, the step time, and on a GPU the model FLOP utilisation (MFU).

    .venv/bin/python benchmarks/train_step.py
    .venv/bin/python benchmarks/train_step.py --batch-size 32 --rounds 20   # e.g. on a GPU

SmolLM2-135M-Instruct (``lora_edu.pretrained``) takes AdamW steps on chapter 8's task
(date arithmetic, ``lora_edu.tasks``) with full fine-tuning, LoRA on q,v (r = 8) and LoRA on
every linear layer (r = 8), each with and without gradient checkpointing. Memory comes from
``lora_edu.ledger.measure_step_memory`` (the tensors' own bytes, the saved activations, and the
peak: MemTracker on the CPU, ``max_memory_allocated`` on CUDA). Step times are medians over
rounds in which every configuration takes one step in turn; each ratio (LoRA ÷ full, or with ÷
without checkpointing) is formed **within a round** and the figure is the median of the
per-round ratios, with their quartiles, so a slow moment hits both sides of a ratio. Run it on an
otherwise idle machine: the load average at the start, before and after the timing is recorded,
with the thread count (``--threads``, 1 by default) and the batch's real token counts; chapter 8
refuses a file whose starting load average exceeds ``BUSY_LOAD``.

The saved activations are also measured at 512, 1,024 and 2,048 tokens (a batch of one
sequence of exactly that many tokens: one example's real tokens repeated, no padding; the
lengths are recorded and checked), to extend the ledger to the lengths of real fine-tuning.

MFU = achieved model FLOP/s ÷ the GPU's peak dense bf16 FLOP/s, with the model FLOPs of
``lora_edu.ledger.flops_per_token`` (``6N`` full, ``4N + 6 N_lora`` LoRA) times the tokens
of the step. Ratios are LoRA ÷ full fine-tuning. Writes
``benchmarks/results/train_step-<device>.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import gc
import multiprocessing
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _provenance import provenance, write_result  # noqa: E402

from lora_edu.ledger import flops_per_token, measure_step_memory, saved_activation_bytes  # noqa: E402
from lora_edu.pretrained import load_smollm2  # noqa: E402
from lora_edu.repro import get_device  # noqa: E402
from lora_edu.sft import _loss, collate, encode_examples, prepare_method, task_data  # noqa: E402

#: Peak dense tensor-core TFLOP/s (bf16), from the vendors' data sheets, by device name.
PEAK_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 PCIe": 756.0,
               "H100": 756.0, "A100": 312.0, "L4": 121.0, "A10G": 70.0, "T4": 65.0}
METHODS = ("full", "lora_qv_r8", "lora_all_r8")
#: Issue 12's target: LoRA's peak at most this fraction of full fine-tuning's.
PEAK_TARGET = 0.40
#: What the timing rounds step through: (method, gradient checkpointing).
TIMED = (("full", False), ("lora_qv_r8", False), ("lora_all_r8", False), ("full", True),
         ("lora_qv_r8", True))
#: Sequence lengths at which the saved activations are measured again (batch of one). With
#: transformers' default SDPA attention no (heads × T × T) tensor is kept for backward, so they
#: grow linearly: full fine-tuning keeps about 3 GB at 2,048 tokens (measured here). An earlier
#: run at 2,048 was killed for memory only because freed model copies were still held (see
#: :func:`keep_large_blocks_on_mmap`).
LONG_SEQUENCES = (512, 1024, 2048)
#: A machine whose 1-minute load average exceeds this before the script starts is busy: its
#: timings are not evidence (EVIDENCE.md §5), and chapter 8 refuses them.
BUSY_LOAD = 0.5


def keep_large_blocks_on_mmap(threshold: int = 64 * 1024) -> bool:
    """Fix glibc's mmap threshold so that freed tensors go back to the operating system.

    glibc raises its threshold each time a large block is freed, up to 32 MiB, so after the
    first model copy is deleted the next copies' tensors (a few MiB each) come from the heap,
    and freeing them no longer lowers the process's memory: measured here, four deleted
    copies of the model with AdamW left 2.9 GB resident instead of 0.9 GB, and this script
    grew by about 1 GB per model until it was killed. Setting the threshold (``mallopt``'s
    ``M_MMAP_THRESHOLD``, -3) turns the adjustment off. Returns whether it was set (not on
    macOS or Windows, which have no ``mallopt``; their allocators return large blocks anyway).
    """
    path = ctypes.util.find_library("c")
    libc = ctypes.CDLL(path) if path else None
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    return bool(libc.mallopt(-3, threshold))   # M_MMAP_THRESHOLD


def quartiles(values: list[float]) -> dict[str, float]:
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return {"median": median, "q1": q1, "q3": q3, "min": min(values), "max": max(values)}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tf * 1e12 for key, tf in PEAK_TFLOPS.items() if key in name), None)


def long_batch(batch: dict[str, torch.Tensor], length: int) -> dict[str, torch.Tensor]:
    """A batch of one sequence of exactly ``length`` tokens: the first example's real tokens
    (its padding dropped) repeated end to end and cut at ``length``; every token attended to
    and scored.

    Raises:
        ValueError: ``length`` is not a positive int.
    """
    if not isinstance(length, int) or length < 1:
        raise ValueError(f"length must be a positive int, got {length!r}")
    row = batch["input_ids"][0][batch["attention_mask"][0].bool()]
    ids = row.repeat(length // row.numel() + 1)[:length].unsqueeze(0)
    assert ids.shape == (1, length), ids.shape
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _long_saved_bytes(method: str, length: int, batch_size: int, threads: int) -> int:
    """In a worker process: the saved activations of ``method`` on the chapter's first
    training example repeated to ``length`` tokens (CPU, fp32)."""
    torch.set_num_threads(threads)
    keep_large_blocks_on_mmap()
    base, tokenizer = load_smollm2()
    batch = collate(encode_examples(tokenizer, task_data()["train"][:batch_size]),
                    tokenizer.eos_token_id)
    long = long_batch(batch, length)
    model = build(base, method, False, torch.device("cpu"))
    return saved_activation_bytes(lambda: _loss(model, long), model)


def build(base, method: str, checkpointing: bool, device: torch.device):
    model = prepare_method(base, method).to(device).train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=8,
                        help="timed steps per method (at least 2: the ratios' quartiles)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (recorded; the chapter's figures are one thread)")
    parser.add_argument("--long", type=int, nargs="+", default=list(LONG_SEQUENCES),
                        help="sequence lengths for the saved activations (a smoke test: 64 128)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error("--rounds must be at least 2 (the per-round ratios need two for quartiles)")
    load_average_start = os.getloadavg()   # before this script did anything
    if load_average_start[0] > BUSY_LOAD:
        print(f"warning: load average {load_average_start[0]:.2f} > {BUSY_LOAD}: the machine "
              "is busy; chapter 8 will refuse these timings", flush=True)
    torch.set_num_threads(args.threads)
    fixed_mmap_threshold = keep_large_blocks_on_mmap()
    device = get_device()
    base, tokenizer = load_smollm2()
    batch = collate(encode_examples(tokenizer, task_data()["train"][:args.batch_size]),
                    tokenizer.eos_token_id)
    batch = {k: v.to(device) for k, v in batch.items()}
    tokens = batch["input_ids"].numel()   # the FLOPs are spent on every position, padding too
    lengths = batch["attention_mask"].sum(dim=1)
    amp = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
           else contextlib.nullcontext())
    result: dict[str, Any] = {**provenance("train_step", device), "model": "SmolLM2-135M-Instruct",
                              "batch_shape": list(batch["input_ids"].shape),
                              "example_tokens": lengths.tolist(),
                              "mean_example_tokens": float(lengths.float().mean()),
                              "threads": torch.get_num_threads(),
                              "load_average_start": load_average_start,
                              "busy_load": BUSY_LOAD,
                              "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
                              "fixed_mmap_threshold": fixed_mmap_threshold,
                              "methods": {}}
    n_params = sum(p.numel() for p in base.parameters())

    def loss_of(model, data=batch):
        with amp:
            return _loss(model, data)

    for checkpointing in (False, True):
        for method in METHODS:
            model = build(base, method, checkpointing, device)
            ledger = measure_step_memory(model, lambda: loss_of(model))
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            key = method + ("+checkpointing" if checkpointing else "")
            result["methods"][key] = {"trainable": trainable, **ledger.to_dict(),
                                      "flops_per_token": flops_per_token(
                                          n_params, trainable, method == "full")}
            print(f"{key:28s} peak {ledger.peak / 2**20:8.1f} MiB  saved activations "
                  f"{ledger.saved_activations / 2**20:7.1f} MiB", flush=True)
            del model
            gc.collect()  # free the copy now: a cycle would keep ~0.5 GB per model alive

    # step times: every configuration in turn, one step per round; ratios within a round
    result["load_average_before"] = os.getloadavg()
    models = {key: build(base, m, ckpt, device) for key in TIMED for m, ckpt in [key]}
    optimizers = {key: torch.optim.AdamW([p for p in models[key].parameters()
                                          if p.requires_grad], lr=1e-5) for key in TIMED}
    times: dict[tuple[str, bool], list[float]] = {key: [] for key in TIMED}
    for round_ in range(args.rounds + 1):
        for key in TIMED:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            loss_of(models[key]).backward()
            optimizers[key].step()
            optimizers[key].zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if round_:  # the first round warms up (allocations, AdamW's state)
                times[key].append(time.perf_counter() - start)
    result["load_average_after"] = os.getloadavg()
    peak = peak_flops(device)
    for m in METHODS:
        entry = result["methods"][m]
        entry["step_seconds"] = statistics.median(times[(m, False)])
        entry["step_seconds_all"] = times[(m, False)]
        achieved = entry["flops_per_token"] * tokens / entry["step_seconds"]
        entry["model_tflops_per_s"] = achieved / 1e12
        entry["mfu"] = achieved / peak if peak else None
    for m in ("full", "lora_qv_r8"):
        result["methods"][m + "+checkpointing"]["step_seconds_all"] = times[(m, True)]
    full = result["methods"]["full"]
    result["per_round"] = {}

    def per_round(name: str, top: tuple[str, bool], bottom: tuple[str, bool]) -> None:
        ratios = [a / b for a, b in zip(times[top], times[bottom])]
        result["per_round"][name] = {"ratios": ratios, **quartiles(ratios)}
        result[f"{name}_ratio"] = statistics.median(ratios)

    for m in METHODS[1:]:
        for suffix in ("", "+checkpointing"):
            lora, ref = result["methods"][m + suffix], result["methods"]["full" + suffix]
            result[f"{m}{suffix.replace('+', '_')}_peak_memory_ratio"] = lora["peak"] / ref["peak"]
        lora = result["methods"][m]
        per_round(f"{m}_step_time", (m, False), ("full", False))
        result[f"{m}_predicted_step_time_ratio"] = lora["flops_per_token"] / full["flops_per_token"]
        result[f"{m}_saved_activations_ratio"] = (lora["saved_activations"]
                                                  / full["saved_activations"])
    for m in ("full", "lora_qv_r8"):  # the price of checkpointing: with ÷ without
        per_round(f"{m}_checkpointing_time", (m, True), (m, False))
    result["peak_target"] = PEAK_TARGET
    for key, value in result.items():
        if key.endswith("_ratio"):
            print(f"{key:52s} {value:6.3f}")
    del models, optimizers
    gc.collect()
    # the timings are written first: the long sequences below need the most memory
    write_result(result, "train_step", device, args.out)

    # saved activations at long sequences: a batch of one, the task's text repeated. On the
    # CPU each (length, method) runs in a fresh process, whose memory goes back to the OS
    # when it ends: in one process the freed activations of each model stayed resident
    # (measured: +2.2 to +3.2 GB per model at 2,048 tokens), and the run was killed.
    result["long_sequences"], result["long_sequence_tokens"] = {}, {}
    for length in args.long:
        long = long_batch(batch, length)
        result["long_sequence_tokens"][str(length)] = int(long["input_ids"].shape[1])
        row = {}
        for method in METHODS:
            if device.type == "cpu":
                with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")
                                         ) as pool:
                    row[method] = pool.submit(_long_saved_bytes, method, length,
                                              args.batch_size, args.threads).result()
            else:
                model = build(base, method, False, device)
                row[method] = saved_activation_bytes(lambda: loss_of(model, long), model)
                del model
                gc.collect()
        result["long_sequences"][str(length)] = row
        print(f"saved activations at {length} tokens: "
              + ", ".join(f"{m} {b / 2**20:.0f} MiB" for m, b in row.items()), flush=True)
        write_result(result, "train_step", device, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
