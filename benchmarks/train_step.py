"""LoRA against full fine-tuning, one training step side by side: time, memory, and on a GPU
the model FLOP utilisation (MFU).

    .venv/bin/python benchmarks/train_step.py                 # the preset that suits the device
    .venv/bin/python benchmarks/train_step.py --preset gpu --batch-size 8 --steps 20

Each method trains a fresh model of the preset with ``lora_edu.train.train`` on the target
corpus, so the figures are the ones the training loop itself measures: the median step time,
and the peak memory (``torch.cuda.max_memory_allocated`` on CUDA, PyTorch's MemTracker on
the CPU) next to the exact bytes of parameters, gradients and optimizer state. Ratios are
LoRA / full fine-tuning. Results go to ``benchmarks/results/train_step-<device>.json``.

MFU = achieved model FLOP/s / the GPU's peak dense bf16/fp16 FLOP/s. Model FLOPs per token
(Kaplan et al. 2020; Chowdhery et al. 2022, appendix B), with ``N`` the weights of the
matrix multiplications and ``12·L·T·d`` the attention scores and mixing:

* full fine-tuning: ``6·N + 12·L·T·d`` (forward ``2N``, backward ``4N``);
* LoRA: ``4·N + 6·N_lora + 12·L·T·d``: frozen weights need no weight gradient, so their
  backward costs ``2N`` instead of ``4N``. (A slight overcount: layers below the first
  adapter need no backward at all. ``tests/test_train.py`` checks both formulas against
  PyTorch's ``FlopCounterMode``.)
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import platform
import sys
from pathlib import Path
from typing import Any

import torch

from lora_edu.data import load_corpus
from lora_edu.lora import LoraConfig, inject_lora
from lora_edu.models import GPT, GPTConfig, gpt_config
from lora_edu.repro import get_device, seed_all
from lora_edu.train import History, TrainConfig, train

from _provenance import write_result  # benchmarks/ is on sys.path

#: Peak dense tensor-core TFLOP/s (bf16, or fp16 where the GPU has no fast bf16), from the
#: vendors' data sheets. Matched against ``torch.cuda.get_device_name()``.
PEAK_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 PCIe": 756.0,
               "H100": 756.0, "A100": 312.0, "L4": 121.0, "A10G": 70.0, "T4": 65.0,
               "V100": 125.0}
#: LoRA peak memory should be at most this fraction of full fine-tuning's on the gpu preset.
GPU_MEMORY_TARGET = 0.40


def matmul_weights(cfg: GPTConfig) -> int:
    """``N``: weights of the matrix multiplications (attention, MLP, the output head)."""
    per_layer = 4 * cfg.d_model**2 + 2 * cfg.d_model * cfg.d_ff
    return cfg.n_layer * per_layer + cfg.d_model * cfg.vocab_size


def flops_per_token(cfg: GPTConfig, lora_params: int | None) -> float:
    """Training FLOPs per token: ``6N`` (full) or ``4N + 6·N_lora`` (LoRA), plus attention."""
    n = matmul_weights(cfg)
    attention = 12 * cfg.n_layer * cfg.block_size * cfg.d_model
    weights = 6 * n if lora_params is None else 4 * n + 6 * lora_params
    return float(weights + attention)


def peak_flops(device: torch.device, override_tflops: float | None) -> float | None:
    if override_tflops is not None:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tf * 1e12 for key, tf in PEAK_TFLOPS.items() if key in name), None)


def run(method: str, preset: str, cfg: TrainConfig, device: torch.device) -> dict[str, Any]:
    """Train a fresh model of ``preset`` with ``method`` ("full" or "lora") and measure it."""
    seed_all(cfg.seed)
    model = GPT(gpt_config(preset))
    if method == "lora":
        inject_lora(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q", "v"]))
    tokens = load_corpus("python-docs").train
    hist: History = train(model, tokens, None, cfg, device)
    mem = hist.memory
    result = {"method": method, "trainable_params": hist.trainable_params,
              "total_params": hist.total_params, "step_time_s": hist.step_time_s,
              "tokens_per_s": hist.tokens_per_s, "precision": hist.precision,
              "peak_bytes": mem.peak_bytes, "peak_source": mem.peak_source,
              "param_bytes": mem.param_bytes, "grad_bytes": mem.grad_bytes,
              "optimizer_state_bytes": mem.optimizer_state_bytes,
              "state_bytes": mem.state_bytes}
    lora_params = hist.trainable_params if method == "lora" else None
    result["model_flops_per_step"] = (flops_per_token(model.config, lora_params)
                                      * cfg.batch_size * model.config.block_size)
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main() -> int:
    device = get_device()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpu" if device.type == "cuda" else "cpu",
                        choices=["tiny", "cpu", "gpu"])
    parser.add_argument("--batch-size", type=int, default=None,
                        help="sequences per step (default: 32 on the gpu preset, else 16)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per method")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's peak TFLOP/s, for a GPU the table does not know")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=None, help="where to write the JSON")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    batch = args.batch_size or (32 if args.preset == "gpu" else 16)
    cfg = TrainConfig(steps=args.steps, batch_size=batch, warmup_steps=1,
                      eval_every=args.steps, desc="benchmark")
    full = run("full", args.preset, cfg, device)
    lora = run("lora", args.preset, cfg, device)
    peak = peak_flops(device, args.peak_tflops)
    for r in (full, lora):
        achieved = r["model_flops_per_step"] / r["step_time_s"]
        r["model_tflops_per_s"] = achieved / 1e12
        r["mfu"] = achieved / peak if peak else None

    ratios = {"lora_step_time_ratio": lora["step_time_s"] / full["step_time_s"],
              "lora_trainable_params_ratio": lora["trainable_params"] / full["trainable_params"],
              "lora_optimizer_state_ratio":
                  lora["optimizer_state_bytes"] / full["optimizer_state_bytes"],
              "lora_state_bytes_ratio": lora["state_bytes"] / full["state_bytes"],
              "lora_peak_memory_ratio": (lora["peak_bytes"] / full["peak_bytes"]
                                         if lora["peak_bytes"] and full["peak_bytes"] else None)}
    threads = torch.get_num_threads()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU ({platform.machine()}, {threads} thread{'s' * (threads != 1)})"
    record = {"device": name, "device_type": device.type, "torch": torch.__version__,
              "python": platform.python_version(),
              "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(["python", "benchmarks/train_step.py", *sys.argv[1:]]),
              "preset": args.preset, "model_config": gpt_config(args.preset).to_dict(),
              "batch_size": batch, "steps": args.steps, "lora": "q, v; r=8, alpha=16",
              "peak_tflops": peak / 1e12 if peak else None,
              "full": full, "lora_qv": lora, **ratios}
    if device.type == "cuda" and args.preset == "gpu":
        record["gpu_memory_target_met"] = ratios["lora_peak_memory_ratio"] <= GPU_MEMORY_TARGET

    print(f"{name} · torch {torch.__version__} · preset {args.preset} · batch {batch} × "
          f"{gpt_config(args.preset).block_size} tokens · {full['precision']}")
    print(f"{'':26}{'full FT':>14}{'LoRA q,v r=8':>14}{'LoRA/full':>12}")
    rows = [("trainable parameters", "trainable_params", "{:,.0f}"),
            ("optimizer state (MB)", "optimizer_state_bytes", "{:.3f}"),
            ("params+grads+opt (MB)", "state_bytes", "{:.3f}"),
            ("peak memory (MB)", "peak_bytes", "{:.2f}"),
            ("step time (ms)", "step_time_s", "{:.2f}"),
            ("tokens / s", "tokens_per_s", "{:,.0f}"),
            ("model TFLOP/s", "model_tflops_per_s", "{:.3f}")]
    for label, key, fmt in rows:
        scale = 1e-6 if key.endswith("bytes") else (1e3 if key == "step_time_s" else 1)
        f, lo = full[key], lora[key]
        if f is None or lo is None:
            continue
        print(f"{label:26}{fmt.format(f * scale):>14}{fmt.format(lo * scale):>14}"
              f"{lo / f:>12.3f}")
    if peak:
        print(f"MFU (peak {peak / 1e12:.0f} TFLOP/s): full {full['mfu']:.1%}, "
              f"LoRA {lora['mfu']:.1%}")
    else:
        print("MFU: not computed (CPU, or a GPU missing from PEAK_TFLOPS: pass --peak-tflops)")
    if "gpu_memory_target_met" in record:
        print(f"LoRA peak memory ratio {ratios['lora_peak_memory_ratio']:.2f} "
              f"(target ≤ {GPU_MEMORY_TARGET}): "
              f"{'met' if record['gpu_memory_target_met'] else 'NOT met'}")
    write_result(record, "train_step", device, out=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
