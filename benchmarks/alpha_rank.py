"""How the best learning rate moves with rank: chapter 8's q,v LoRA with α fixed at 16.

Chapter 8's methods use α = 2r, so the scale s = α/r = 2 is the same at every rank. The other
common convention fixes α (here 16, so s = 16/r): at r = 8 the two coincide, at r = 1 the
scale is 8× larger and at r = 64 8× smaller. This script runs q,v LoRA at r = 1 and r = 64
with α = 16 through the selection procedure of ``benchmarks/real_sweep.py`` (the same
training, data, validation split, grids a factor √10 apart grown past an edge that holds the
best), so that chapter 8 can set the chosen rate against the rank under both conventions.
It is a selection experiment (which rate is best), so it runs selection seeds only; by
default the first of the sweep's, for budget.

Writes ``benchmarks/results/alpha_rank-<device>.json``. Run it from a clean commit:

    python benchmarks/alpha_rank.py
    python benchmarks/alpha_rank.py --resume    # a run cut short goes on
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _provenance import RESULTS, provenance, resumed_runs, write_result  # noqa: E402
from real_sweep import (  # noqa: E402
    GRID,
    MAX_EXTENSIONS,
    SELECTION_SEEDS,
    _init_worker,
    _key,
    _run,
    past_edge,
)

from lora_edu.pretrained import load_smollm2  # noqa: E402
from lora_edu.repro import get_device  # noqa: E402
from lora_edu.sft import ALPHA_FIXED, chat_references  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=1,
                        help="how many of the sweep's selection seeds to run")
    parser.add_argument("--workers", type=int, default=2, help="processes, one thread each")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--resume", action="store_true",
                        help="keep the runs of a result file of this same clean commit and "
                             "run only the missing ones")
    args = parser.parse_args()
    device = get_device()
    started = time.time()
    seeds = list(SELECTION_SEEDS[:args.seeds])
    methods = list(ALPHA_FIXED)
    grid = {m: list(GRID[m]) for m in methods}
    result = {**provenance("alpha_rank", device), "steps": args.steps,
              "batch_size": args.batch_size, "workers": args.workers,
              "selection_seeds": seeds, "report_seeds": [],
              "selection_metric": "mean over selection seeds of validation result_nll",
              "load_average_start": os.getloadavg(), "grid": grid,
              "alpha": {m: ALPHA_FIXED[m][2] for m in methods}, "runs": [], "best_lr": {}}
    out_file = args.out or RESULTS / f"alpha_rank-{device.type}.json"
    done = resumed_runs(out_file, result, _key) if args.resume else {}
    base, tokenizer = load_smollm2()
    chat = chat_references(base, tokenizer)
    del base
    common = {"kind": "run", "phase": "selection", "implementation": "lora_edu",
              "steps": args.steps, "batch_size": args.batch_size, "adapters": None}

    def collect(pool, jobs):
        result["runs"] += [done.pop(_key(j)) for j in jobs if _key(j) in done]
        for out in pool.map(_run, [j for j in jobs if _key(j) not in
                                   {_key(r) for r in result["runs"]}]):
            out.pop("kind")
            result["runs"].append(out)
            print(f"[{time.time() - started:6.0f}s] {out['method']:20s} lr={out['lr']:g} "
                  f"seed={out['seed']} val_result_nll={out['validation']['result_nll']:.3f}",
                  flush=True)
            write_result(result, "alpha_rank", device, out_file)  # after every run: resumable

    def best_lr(m):
        def mean_val(lr):
            vals = [r["validation"]["result_nll"] for r in result["runs"]
                    if r["method"] == m and r["lr"] == lr]
            return sum(vals) / len(vals)
        return min(grid[m], key=mean_val)

    with ProcessPoolExecutor(args.workers, initializer=_init_worker,
                             initargs=(1, chat, False)) as pool:
        collect(pool, [{**common, "method": m, "lr": lr, "seed": s} for m in methods
                       for lr in grid[m] for s in seeds])
        for _ in range(MAX_EXTENSIONS):
            extra = [(m, lr) for m in methods if (lr := past_edge(grid[m], best_lr(m)))]
            for m, lr in extra:
                grid[m] = sorted(grid[m] + [lr])
            collect(pool, [{**common, "method": m, "lr": lr, "seed": s} for m, lr in extra
                           for s in seeds])
    result["best_lr"] = {m: best_lr(m) for m in methods}
    result["seconds"] = time.time() - started
    result["load_average_end"] = os.getloadavg()
    write_result(result, "alpha_rank", device, out_file)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
