"""Chapter 4's sweep: intrinsic dimension with every arm tuned, on fresh seeds.

Every configuration (a method, its size, a start) is tuned the same way
(``../shared/EVIDENCE.md``): each learning rate of a window of the grid runs with the two
**selection seeds**, the best mean **validation** accuracy picks the rate (a best at the
window's edge widens the window, up to the grid's ends), and the chosen rate then runs with
the five **report seeds**, which took no part in the choice; the chapter reads their **test**
accuracy. The runner-up rate (the second-best mean validation accuracy) runs with the same
report seeds (``runner_up``), so that every verdict can be checked at it too: where two rates
are within the selection noise, a verdict that flips between them rests on the choice. The arms (:class:`lora_edu.intrinsic.TransferExperiment` says what each trains and
what a seed fixes):

* the pretrained start (task A, 1,000 steps): full fine-tuning, the head alone, LoRA + head at
  ranks 1-8, DID and SAID at every ``d`` of the grid, DID with a sparse ``P`` (Exercise 1);
* DID at exactly as many trained numbers as the head alone and as each LoRA + head, so that
  those comparisons are made at equal numbers (these ``d`` are outside the doubling grid and
  take no part in ``d90`` or in the one-rate control);
* the start from scratch: full training and DID;
* DID on the pretrained start with **one** learning rate for every ``d`` (the rate whose mean
  validation accuracy over all ``d`` is best, and its runner-up), against the rate tuned for
  each ``d``;
* pretraining length: full fine-tuning, DID and SAID from starts pretrained for 0-3,000 steps;
* a task B with a teacher of its own (Exercise 4): full training and DID from both starts.

Writes ``benchmarks/results/intrinsic_dimension-cpu.json`` (accuracies, no timings). About
20 minutes on one idle CPU core.

    python benchmarks/intrinsic_dimension.py --workers 2     # about 10 minutes on 2 cores
    python benchmarks/intrinsic_dimension.py --quick --out /tmp/id.json   # a smoke test
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _provenance import provenance, write_result

from lora_edu.intrinsic import TransferExperiment

GRID = [m * 10.0 ** e for e in range(-5, 2) for m in (1, 3)]   # 1e-5 ... 30, ×3 / ×3.3
WINDOW = (1e-4, 1.0)                                             # where every arm starts
SELECT_SEEDS = (1000, 1001)
REPORT_SEEDS = (0, 1, 2, 3, 4)
DIMS = [8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]
LORA_RANKS = [1, 2, 4, 8]
PRE_STEPS = 1000
PRE_SWEEP = [0, 100, 300, 1000, 3000]
OWN_TEACHER = 7


def tune(ex: TransferExperiment, method: str, size: int, start: str = "pretrained",
         pre_steps: int = PRE_STEPS, seeds: tuple[int, ...] | None = None,
         log: str = "") -> dict:
    """Selection runs over a window of GRID, widened while the best sits at its edge."""
    seeds = SELECT_SEEDS if seeds is None else seeds     # read at call time (--quick sets it)
    lo, hi = GRID.index(WINDOW[0]), GRID.index(WINDOW[1])
    val: dict[float, list[float]] = {}
    while True:
        for lr in GRID[lo:hi + 1]:
            if lr not in val:
                val[lr] = [ex.run(method, size, lr, s, start, pre_steps)["val"] for s in seeds]
        means = {lr: float(np.mean(v)) for lr, v in val.items()}
        best = max(sorted(means), key=lambda lr: means[lr])   # ties: the smaller rate
        i = GRID.index(best)
        if i == lo and lo > 0:
            lo -= 1
        elif i == hi and hi < len(GRID) - 1:
            hi += 1
        else:
            break
    runner_up = runner_up_lr(means)
    print(f"  {log}{method} {size} {start} pre={pre_steps}: lr {best:g} "
          f"(val {means[best]:.4f}; next {runner_up:g} at {means[runner_up]:.4f})", flush=True)
    return {"selection": [{"lr": lr, "val": val[lr]} for lr in sorted(val)],
            "best_lr": best, "runner_up_lr": runner_up,
            "at_grid_edge": GRID.index(best) in (0, len(GRID) - 1)}


def runner_up_lr(means: dict[float, float]) -> float:
    """The rate with the second-best mean validation accuracy (ties: the smaller rate), the
    same order that picks the best."""
    ranked = sorted(means, key=lambda lr: (-means[lr], lr))
    return ranked[1]


def report(ex: TransferExperiment, method: str, size: int, lr: float, start: str,
           pre_steps: int, seeds: tuple[int, ...] | None = None) -> dict:
    seeds = REPORT_SEEDS if seeds is None else seeds     # read at call time (--quick sets it)
    runs = [ex.run(method, size, lr, s, start, pre_steps) for s in seeds]
    return {"lr": lr, "seeds": list(seeds), "val": [r["val"] for r in runs],
            "test": [r["test"] for r in runs]}


def config(ex: TransferExperiment, method: str, size: int, start: str = "pretrained",
           pre_steps: int = PRE_STEPS, teacher: int = 0, projection: str = "hadamard",
           log: str = "") -> dict:
    """One configuration: tuned on the selection seeds, then reported on the report seeds at
    the chosen rate (``report``) and at the runner-up rate (``runner_up``), so that a verdict
    can be checked against the choice between two near-tied rates."""
    tuned = tune(ex, method, size, start, pre_steps, log=log)
    return {"method": method, "size": size, "start": start, "pre_steps": pre_steps,
            "teacher": teacher, "projection": projection,
            "trainable": ex.trainable(method, size), **tuned,
            "report": report(ex, method, size, tuned["best_lr"], start, pre_steps),
            "runner_up": report(ex, method, size, tuned["runner_up_lr"], start, pre_steps)}


_EXPERIMENTS: dict[str, TransferExperiment] = {}


def _experiments(settings: dict) -> dict[str, TransferExperiment]:
    """The three experiments (one per process): the main one, task B with its own teacher,
    and the sparse projection."""
    torch.set_num_threads(1)
    _EXPERIMENTS.update(main=TransferExperiment(**settings),
                        own=TransferExperiment(**settings, task_b_teacher=OWN_TEACHER),
                        sparse=TransferExperiment(**settings, projection="sparse"))
    return _EXPERIMENTS


def _job(job: tuple[str, str, tuple, dict]) -> dict:
    """One job of the sweep in this process: ``(experiment, "config" or "report", args, kw)``.
    Every run seeds everything it draws, so a job's result does not depend on the process."""
    name, kind, args, kwargs = job
    return (config if kind == "config" else report)(_EXPERIMENTS[name], *args, **kwargs)


def _run_jobs(jobs: list, pool) -> list[dict]:
    return list(pool.imap(_job, jobs, chunksize=1)) if pool else [_job(j) for j in jobs]


def main() -> int:
    global DIMS, LORA_RANKS, PRE_SWEEP, REPORT_SEEDS, SELECT_SEEDS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny settings to check that the script runs (not for committing)")
    parser.add_argument("--workers", type=int, default=1,
                        help="processes (one thread each); the results do not depend on it")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    settings = {"n_a": 4096, "n_b": 256, "width": 64, "steps": 200, "pre_lr": 3e-3}
    if args.quick:
        settings["steps"] = 10
        DIMS, LORA_RANKS, PRE_SWEEP = [8, 64], [1], [0, PRE_STEPS]
        REPORT_SEEDS, SELECT_SEEDS = (0, 1), (1000,)
    started = time.time()
    device = torch.device("cpu")
    ex = _experiments(settings)["main"]
    pool = (multiprocessing.get_context("fork").Pool(args.workers, _experiments, (settings,))
            if args.workers > 1 else None)
    # DID at the head's and each LoRA rank's number of trained numbers (off the grid)
    equal_dims = sorted({ex.trainable(m, r) for m, r in [("head", 0)]
                         + [("lora", r) for r in LORA_RANKS]} - set(DIMS))
    result = {**provenance("intrinsic_dimension", device), "settings": {
        **settings, "D": ex.D, "n_val": ex.n_val, "n_test": ex.n_test, "dims": DIMS,
        "lora_ranks": LORA_RANKS, "equal_dims": equal_dims, "grid": GRID, "window": list(WINDOW),
        "select_seeds": list(SELECT_SEEDS), "report_seeds": list(REPORT_SEEDS),
        "pre_steps": PRE_STEPS, "pre_sweep": PRE_SWEEP, "own_teacher": OWN_TEACHER},
        "configs": []}
    jobs = []

    def add(experiment: str, *a, **k) -> None:
        jobs.append((experiment, "config", a, k))

    # the main arms
    for start in ("pretrained", "scratch"):
        add("main", "full", 0, start)
        for d in DIMS:
            add("main", "did", d, start)
    add("main", "head", 0)
    for r in LORA_RANKS:
        add("main", "lora", r)
    for n in equal_dims:
        add("main", "did", n, log="[equal numbers] ")
    for d in DIMS:
        add("main", "said", d)
    for d in DIMS:
        add("sparse", "did", d, projection="sparse")
    # pretraining length
    for steps in PRE_SWEEP:
        if steps == PRE_STEPS:
            continue
        add("main", "full", 0, pre_steps=steps, log=f"[pre {steps}] ")
        for d in DIMS:
            add("main", "did", d, pre_steps=steps)
            add("main", "said", d, pre_steps=steps)
    # task B with its own teacher
    for start in ("pretrained", "scratch"):
        add("own", "full", 0, start, teacher=OWN_TEACHER)
        for d in DIMS:
            add("own", "did", d, start, teacher=OWN_TEACHER)
    configs = result["configs"] = _run_jobs(jobs, pool)

    print("one learning rate for every d", flush=True)
    did = [c for c in configs if c["method"] == "did" and c["start"] == "pretrained"
           and c["pre_steps"] == PRE_STEPS and c["teacher"] == 0
           and c["projection"] == "hadamard" and c["size"] in DIMS]
    common = set.intersection(*({s["lr"] for s in c["selection"]} for c in did))
    mean_val = {lr: float(np.mean([np.mean(next(s["val"] for s in c["selection"]
                                                 if s["lr"] == lr)) for c in did]))
                for lr in common}
    single = max(sorted(mean_val), key=lambda lr: mean_val[lr])
    single_2nd = runner_up_lr(mean_val)
    result["single_lr"] = {"lr": single, "runner_up_lr": single_2nd, "mean_val": mean_val}
    for key, lr in (("report", single), ("runner_up", single_2nd)):
        # a configuration's own report at this rate is reused (same rate, same seeds)
        done = {c["size"]: c[k] for c in did for k in ("report", "runner_up")
                if c[k]["lr"] == lr}
        redo = [c for c in did if c["size"] not in done]
        redone = _run_jobs([("main", "report", ("did", c["size"], lr, "pretrained",
                                                PRE_STEPS), {}) for c in redo], pool)
        done.update({c["size"]: r for c, r in zip(redo, redone)})
        result["single_lr"][key] = {str(c["size"]): done[c["size"]] for c in did}
    if pool:
        pool.close()
    for steps in PRE_SWEEP:
        ex.pretrained(steps)              # cached in the workers; here for the accuracy
    result["pretrain_accuracy"] = {str(k): v for k, v in sorted(ex.pretrain_accuracy.items())}

    # the run time is printed, not recorded: the machine this ran on may have been busy
    print(f"{len(configs)} configurations in {time.time() - started:.0f} s", flush=True)
    write_result(result, "intrinsic_dimension", device, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
