"""Does showing the work matter? Chapter 8's task without the scratchpad.

Chapter 8's answers show their work (``2021-02-26 + 7 = 2021-03-05``). This script trains the
configuration the chapter re-runs live, LoRA on q,v at r = 8, on the same questions with
**bare** answers (``2021-03-05``), with the same budget and the sweep's own procedure: seed 0
at three learning rates, the grid grown past an edge that holds the best (by validation
loss), then more seeds at the best. The worked version's runs are those of
``benchmarks/real_sweep.py`` (the same method, data order and budget); the chapter scores both
on the result date alone.

Writes ``benchmarks/results/show_work-<device>.json``. About 25 minutes on one CPU core
(beside the sweep).

    python benchmarks/show_work.py
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _provenance import provenance, write_result  # noqa: E402
from real_sweep import GRID as SWEEP_GRID  # noqa: E402
from real_sweep import MAX_EXTENSIONS, past_edge  # noqa: E402

from lora_edu.pretrained import load_smollm2  # noqa: E402
from lora_edu.repro import get_device  # noqa: E402
from lora_edu.sft import run_method, task_data  # noqa: E402

METHOD = "lora_qv_r8"
GRID = SWEEP_GRID[METHOD]  # the worked version's grid, so both start from the same rates
_WORKER: dict = {}


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)
    base, tokenizer = load_smollm2()
    _WORKER.update(base=base, tokenizer=tokenizer, data=task_data(show_work=False))


def _run(job: dict) -> dict:
    return run_method(_WORKER["base"], _WORKER["tokenizer"], METHOD, job["lr"], job["seed"],
                      _WORKER["data"], job["steps"], job["batch_size"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1, help="processes, one thread each")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = get_device()
    started = time.time()
    result = {**provenance("show_work", device), "method": METHOD, "answers": "bare",
              "steps": args.steps, "batch_size": args.batch_size, "runs": []}

    def collect(pool, lrs_seeds):
        jobs = [{"lr": lr, "seed": seed, "steps": args.steps, "batch_size": args.batch_size}
                for lr, seed in lrs_seeds]
        for out in pool.map(_run, jobs):
            result["runs"].append(out)
            print(f"[{time.time() - started:6.0f}s] bare lr={out['lr']:g} seed={out['seed']} "
                  f"val={out['val_loss']:.3f} test={out['test_loss']:.3f} "
                  f"EM={out['test_exact_match']:.3f}", flush=True)
        write_result(result, "show_work", device, args.out)

    def best_lr():
        return min((r for r in result["runs"] if r["seed"] == 0),
                   key=lambda r: r["val_loss"])["lr"]

    grid = list(GRID)
    with ProcessPoolExecutor(args.workers, initializer=_init_worker, initargs=(1,)) as pool:
        collect(pool, [(lr, 0) for lr in grid])
        for _ in range(MAX_EXTENSIONS):
            lr = past_edge(grid, best_lr())
            if lr is None:
                break
            grid = sorted(grid + [lr])
            collect(pool, [(lr, 0)])
        result["grid"], result["best_lr"] = grid, best_lr()
        collect(pool, [(result["best_lr"], seed) for seed in range(1, args.seeds)])
    result["seconds"] = time.time() - started
    write_result(result, "show_work", device, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
