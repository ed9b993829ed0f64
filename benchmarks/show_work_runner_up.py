"""Chapter 8's answer forms at their **runner-up** learning rates.

``benchmarks/show_work.py`` chooses each answer form's rate with two selection seeds, and with
two seeds the chosen rate and the runner-up (the second-lowest mean validation result loss) are
often within the selection noise. EVIDENCE.md §1: where two rates are within the selection
noise, report both. This script reads the finished ``show_work`` result, takes each form's
runner-up from its selection runs (the worked form's from the sweep's, since its rate is the
sweep's choice) and runs the report seeds there with ``show_work``'s own worker: the same
budget, data order, test questions and greedy result score.

Writes ``benchmarks/results/show_work_runner_up-<device>.json``: ``runs`` of phase ``report``,
``best_lr`` the runner-up rates, ``chosen_lr`` the chosen ones, ``source_git_commit`` /
``source_date`` the ``show_work`` result it was made from. Run it from a clean commit:

    python benchmarks/show_work_runner_up.py             # 9 runs, ~7 min each on 2 workers
    python benchmarks/show_work_runner_up.py --resume    # a run cut short goes on
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _provenance import RESULTS, provenance, resumed_runs, write_result  # noqa: E402
from show_work import METHOD, WORKED, _init_worker, _key, _run  # noqa: E402

from lora_edu.repro import get_device  # noqa: E402
from lora_edu.sweep import Sweep  # noqa: E402


def form_ranking(work: dict, form: str) -> list[float]:
    """The form's rates, best first, by mean validation result loss over the selection seeds
    (the ranking ``show_work`` chose from; its recorded choice must top it)."""
    curve = {lr: [r["validation"]["result_nll"] for r in work["runs"]
                  if (r["form"], r["lr"], r["phase"]) == (form, lr, "selection")]
             for lr in work["grid"][form]}
    short = [lr for lr, vals in curve.items() if len(vals) != len(work["selection_seeds"])]
    if short or len(curve) < 2:
        raise ValueError(f"{form}: rates {short} lack selection runs (or the grid has one "
                         "rate): the selection is incomplete")
    means = {lr: float(np.mean(vals)) for lr, vals in curve.items()}
    ranking = sorted(means, key=lambda lr: (means[lr], lr))
    if ranking[0] != work["best_lr"][form]:
        raise ValueError(f"{form}: the recorded choice {work['best_lr'][form]} is not the best "
                         f"of its selection runs ({ranking[0]})")
    return ranking


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2, help="processes, one thread each")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--resume", action="store_true",
                        help="keep the runs of a result file of this same clean commit and "
                             "run only the missing ones")
    args = parser.parse_args()
    device = get_device()
    started = time.time()
    work_path = RESULTS / f"show_work-{device.type}.json"
    work = json.loads(work_path.read_text())
    if "seconds" not in work:
        raise SystemExit(f"{work_path} is not finished: let show_work.py end first")
    sweep = Sweep.load(f"real_sweep-{device.type}.json")
    if sweep.data["git_commit"] != work["source_git_commit"]:
        raise SystemExit("the sweep is not the one show_work.py was made from")
    runner_up = {f: form_ranking(work, f)[1] for f in work["forms"]}
    runner_up[WORKED] = sweep.runner_up_lr(METHOD)
    result = {**provenance("show_work_runner_up", device), "method": METHOD,
              "forms": work["forms"], "worked_form": WORKED,
              "steps": work["steps"], "batch_size": work["batch_size"],
              "report_seeds": work["report_seeds"],
              "chosen_lr": work["best_lr"], "best_lr": runner_up,
              "source_git_commit": work["git_commit"], "source_date": work["date"],
              "runs": []}
    out_file = args.out or RESULTS / f"show_work_runner_up-{device.type}.json"
    done = resumed_runs(out_file, result, _key) if args.resume else {}
    if done and json.loads(out_file.read_text())["source_date"] != work["date"]:
        raise SystemExit(f"--resume: {out_file} was made from another show_work result")
    jobs = [{"form": f, "lr": lr, "seed": s, "phase": "report", "steps": work["steps"],
             "batch_size": work["batch_size"]}
            for f, lr in runner_up.items() for s in work["report_seeds"]]
    result["runs"] += [done.pop(_key(j)) for j in jobs if _key(j) in done]
    todo = [j for j in jobs if _key(j) not in {_key(r) for r in result["runs"]}]
    with ProcessPoolExecutor(args.workers, initializer=_init_worker,
                             initargs=(1, False)) as pool:
        for out in pool.map(_run, todo):
            result["runs"].append(out)
            print(f"[{time.time() - started:6.0f}s] {out['form']:12s} lr={out['lr']:g} "
                  f"seed={out['seed']} test_result_greedy="
                  f"{out['test']['result_greedy_accuracy']:.3f}", flush=True)
            write_result(result, "show_work_runner_up", device, out_file)  # resumable
    result["seconds"] = time.time() - started
    write_result(result, "show_work_runner_up", device, out_file)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
