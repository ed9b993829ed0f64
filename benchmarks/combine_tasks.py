"""Train the two task adapters that chapter 12 combines, on the real model, and commit them.

One LoRA adapter (r = 8, α = 16, on ``q_proj`` and ``v_proj`` of every layer) per task of
``lora_edu.letter_tasks`` (``reverse``, ``shift``) and per seed, trained on
SmolLM2-135M-Instruct with AdamW on the answer tokens' cross-entropy. Each adapter is saved in
PEFT's layout (``adapter_model.safetensors`` in bfloat16 to keep the repository small, and
``adapter_config.json``) under ``src/lora_edu/assets/combine/<task>-s<seed>/``, so that the
chapter (and Colab, which installs the package) loads it without training. The JSON
``benchmarks/results/combine_tasks-<device>.json`` records the command, git commit, device,
torch version, date, the settings, and each adapter's teacher-forced scores on both tasks.

    python benchmarks/combine_tasks.py                 # what was committed
    python benchmarks/combine_tasks.py --steps 20 --seeds 0 --out /tmp/x   # a quick try
    python benchmarks/combine_tasks.py --from-log train.log   # JSON of a stopped run

``--from-log`` trains nothing: it writes the JSON from the printed log of a training run that
was stopped before its end (the adapters it finished are saved already), with every score and
loss line of that log, and says so in the file.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _provenance import provenance, write_result  # noqa: E402

from lora_edu.adapters import PEFT_WEIGHTS_NAME, save_peft_adapter  # noqa: E402
from lora_edu.letter_tasks import (TASKS, answer_loss, make_examples, encode_task,  # noqa: E402
                                   teacher_forced_scores)
from lora_edu.lora import LoraConfig, inject_lora, lora_layers  # noqa: E402
from lora_edu.pretrained import load_smollm2  # noqa: E402
from lora_edu.repro import get_device, seed_all  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "src" / "lora_edu" / "assets" / "combine"
#: The evaluation sets (the chapter draws the same ones): seed and size per task.
EVAL_SEED, EVAL_N = 1000, 128


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def reset_adapter(model: torch.nn.Module, seed: int) -> None:
    """Fresh LoRA weights (A random, B = 0) drawn from ``seed``."""
    seed_all(seed)
    for _, layer in lora_layers(model):
        layer.reset_lora_parameters()


def train_one(model, tokenizer, task: str, seed: int, steps: int, batch_size: int,
              lr: float, eval_sets: dict, device: torch.device) -> dict:
    reset_adapter(model, seed)
    examples = make_examples(task, steps * batch_size, seed=seed, exclude=eval_sets[task][1])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 10) * max(0.0, 1 - s / steps))
    model.train()
    start, losses = time.time(), []
    for step in range(steps):
        batch = encode_task(tokenizer, examples[step * batch_size:(step + 1) * batch_size])
        loss = answer_loss(model, batch.to(device))
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 25 == 0 or step == steps - 1:
            print(f"  {task} seed {seed} step {step:4d} loss {loss.item():.3f} "
                  f"({time.time() - start:.0f} s)", flush=True)
    model.eval()
    scores = {t: teacher_forced_scores(model, b.to(device)) for t, (b, _) in eval_sets.items()}
    return {"train_seconds": round(time.time() - start, 1),
            "first_loss": losses[0], "last_10_loss": sum(losses[-10:]) / 10, "scores": scores}


def save_bf16(model: torch.nn.Module, directory: Path) -> None:
    save_peft_adapter(model, directory)
    path = directory / PEFT_WEIGHTS_NAME
    tensors = {k: v.to(torch.bfloat16).contiguous() for k, v in load_file(str(path)).items()}
    save_file(tensors, str(path), metadata={"format": "pt"})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=ASSETS)
    parser.add_argument("--result", type=Path, default=None)
    parser.add_argument("--from-log", type=Path, default=None,
                        help="write the JSON from a stopped training run's printed log")
    parser.add_argument("--train-commit", default=None,
                        help="with --from-log: the git commit the training run ran at")
    args = parser.parse_args()
    if args.from_log:
        return record_from_log(args)
    torch.set_num_threads(1 if get_device().type == "cpu" else torch.get_num_threads())
    device = get_device()
    commit = git_commit()
    model, tokenizer = load_smollm2(device=device)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    eval_sets = {}
    for task in TASKS:
        examples = make_examples(task, EVAL_N, seed=EVAL_SEED)
        eval_sets[task] = (encode_task(tokenizer, examples), examples)
    base_scores = {t: teacher_forced_scores(model, b.to(device))
                   for t, (b, _) in eval_sets.items()}
    print("base model:", base_scores, flush=True)
    inject_lora(model, config)
    adapters = {}
    for seed in args.seeds:  # seed-major: each finished seed gives a complete pair
        for task in TASKS:
            result = train_one(model, tokenizer, task, seed, args.steps, args.batch_size,
                               args.lr, eval_sets, device)
            name = f"{task}-s{seed}"
            save_bf16(model, args.out / name)
            adapters[name] = result
            print(f"{name}: {result['scores']}", flush=True)
    result = {**provenance("combine_tasks", device), "git_commit": commit,
              "settings": settings(args, config), "base_scores": base_scores,
              "adapters": adapters}
    write_result(result, "combine_tasks", device, out=args.result)
    return 0


def settings(args: argparse.Namespace, config: LoraConfig) -> dict:
    return {"model": "SmolLM2-135M-Instruct (lora_edu.pretrained)",
            "lora": config.to_dict(), "steps": args.steps, "batch_size": args.batch_size,
            "lr": args.lr, "optimizer": "AdamW, weight_decay 0, 10 warm-up steps then "
            "linear decay to 0", "seeds": args.seeds, "eval_seed": EVAL_SEED,
            "eval_examples_per_task": EVAL_N, "saved_dtype": "bfloat16",
            "out": str(args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT)
                       else args.out)}


def record_from_log(args: argparse.Namespace) -> int:
    """The JSON of a training run stopped before its end, from its printed log."""
    import ast

    lines = [line.rstrip() for line in args.from_log.read_text().splitlines()
             if " step " in line or line.startswith("base model:") or line.split(":")[0] in
             {f"{t}-s{s}" for t in TASKS for s in range(100)}]
    base = next(ast.literal_eval(line.split(":", 1)[1].strip()) for line in lines
                if line.startswith("base model:"))
    adapters = {line.split(":")[0]: {"scores": ast.literal_eval(line.split(":", 1)[1].strip())}
                for line in lines if line.split(":")[0].startswith(TASKS)}
    device = get_device()
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    result = {**provenance("combine_tasks", device),
              "git_commit": args.train_commit or git_commit(),
              "settings": settings(args, config), "base_scores": base, "adapters": adapters,
              "note": "the training run (python benchmarks/combine_tasks.py, every default) "
                      "was stopped on a shared, overloaded 2-core machine after the adapters "
                      f"listed here ({', '.join(adapters)}); this file was written from its "
                      "printed log by the command below, and `date` is when it was written",
              "train_log": lines}
    write_result(result, "combine_tasks", device, out=args.result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
