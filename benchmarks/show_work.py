"""Does showing the work matter, and why? Chapter 8's task in two other answer forms.

Chapter 8's answers show their work (``2021-02-26 + 7 = 2021-03-05``). This script trains the
configuration the chapter re-runs live, LoRA on q,v at r = 8, on the same questions with

* **bare** answers (``2021-03-05``): no working at all, fewer than half the supervised tokens;
* **result first** (``2021-03-05 = 2021-02-26 + 7``): the same tokens as the worked answer,
  but the result comes before the working, so a left-to-right model cannot use it. This is the
  control that separates the two things a scratchpad adds: intermediate *supervision* (more
  tokens to learn from, which result-first keeps) and intermediate *computation* (the start
  date written before the sum, which result-first removes).

Each form gets the sweep's own procedure (``benchmarks/real_sweep.py``): its learning rate
chosen on the validation split with the selection seeds (the grid grown past an edge that
holds the best), then the report seeds on the test set, with the same budget and data order.
The worked version's rate is the sweep's choice (read from ``--sweep``); its report runs are
run again here, because the forms are compared on a score the sweep (at its commit) did not
keep: ``result_greedy``, greedy decoding writing the right result with nothing given
(``lora_edu.sft.score_examples``). ``result_ok`` is teacher forced on whatever precedes the
result, so for the worked form it is helped by the reference start date and would favour it.

Writes ``benchmarks/results/show_work-<device>.json``. Run it from a clean commit:

    python benchmarks/show_work.py
    python benchmarks/show_work.py --resume    # a run cut short goes on
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _provenance import RESULTS, provenance, resumed_runs, write_result  # noqa: E402
from real_sweep import GRID as SWEEP_GRID  # noqa: E402
from real_sweep import (  # noqa: E402
    MAX_EXTENSIONS,
    REPORT_SEEDS,
    SELECTION_SEEDS,
    compact_items,
    past_edge,  # noqa: E402
)

from lora_edu.pretrained import load_smollm2  # noqa: E402
from lora_edu.repro import get_device  # noqa: E402
from lora_edu.sft import run_method, task_data  # noqa: E402

METHOD = "lora_qv_r8"
GRID = SWEEP_GRID[METHOD]  # the worked version's grid, so every form starts from the same rates
FORMS = {"bare": {"show_work": False}, "result_first": {"result_first": True}}
#: The sweep's own form; its rate comes from the sweep's selection.
WORKED = "worked"
_WORKER: dict = {}


def _key(run: dict) -> tuple:
    """What identifies a run (or a job)."""
    return (run["form"], run["lr"], run["seed"], run["phase"])


def _init_worker(threads: int, quick: bool) -> None:
    torch.set_num_threads(threads)
    base, tokenizer = load_smollm2()
    data = {form: task_data(**kw) for form, kw in {**FORMS, WORKED: {}}.items()}
    if quick:  # a smoke test: a few questions of each split
        data = {f: {**d, "validation": d["validation"][::20], "test": d["test"][::50]}
                for f, d in data.items()}
    _WORKER.update(base=base, tokenizer=tokenizer, data=data)


def _run(job: dict) -> dict:
    report = job["phase"] == "report"
    record = run_method(_WORKER["base"], _WORKER["tokenizer"], METHOD, job["lr"], job["seed"],
                        _WORKER["data"][job["form"]], job["steps"], job["batch_size"],
                        evaluate=("validation", "test") if report else ("validation",),
                        keep_items=("test",) if report else (), forgetting=False)
    if "test_items" in record:
        items = record["test_items"]
        record["test_items"] = {**compact_items(items), "result_greedy": "".join(
            "1" if v else "0" for v in items["result_greedy"])}
    return {**record, "form": job["form"], "phase": job["phase"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2, help="processes, one thread each")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--sweep", type=Path, default=None,
                        help="the sweep whose chosen rate the worked form uses "
                             "(default: results/real_sweep-<device>.json)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke test: a few questions, one seed of each kind")
    parser.add_argument("--resume", action="store_true",
                        help="keep the runs of a result file of this same clean commit and "
                             "run only the missing ones")
    args = parser.parse_args()
    selection = SELECTION_SEEDS[:1] if args.quick else SELECTION_SEEDS
    report = REPORT_SEEDS[:1] if args.quick else REPORT_SEEDS
    device = get_device()
    started = time.time()
    sweep_path = args.sweep or RESULTS / f"real_sweep-{device.type}.json"
    sweep = json.loads(sweep_path.read_text())
    if METHOD in sweep.get("best_lr", {}):
        worked_lr = sweep["best_lr"][METHOD]
    elif args.quick:  # a smoke test may read a partial sweep: its ranking so far
        from lora_edu.sweep import Sweep
        worked_lr = Sweep(sweep, sweep_path).selection_ranking(METHOD)[0][0]
    else:
        raise SystemExit(f"{sweep_path} has no chosen rate for {METHOD}: let the sweep finish")
    result = {**provenance("show_work", device), "method": METHOD, "forms": list(FORMS),
              "worked_form": WORKED,
              "steps": args.steps, "batch_size": args.batch_size,
              "selection_seeds": list(selection), "report_seeds": list(report),
              "selection_metric": "mean over selection seeds of validation result_nll",
              "source_git_commit": sweep["git_commit"], "source_date": sweep["date"],
              "runs": [], "grid": {}, "best_lr": {}}
    out_file = args.out or RESULTS / f"show_work-{device.type}.json"
    done = resumed_runs(out_file, result, _key) if args.resume else {}
    if done and result.get("source_date") != json.loads(out_file.read_text())["source_date"]:
        raise SystemExit(f"--resume: {out_file} was made from another sweep")

    def collect(pool, jobs):
        result["runs"] += [done.pop(_key(j)) for j in jobs if _key(j) in done]
        for out in pool.map(_run, [j for j in jobs if _key(j) not in
                                   {_key(r) for r in result["runs"]}]):
            result["runs"].append(out)
            test = out.get("test", {})
            print(f"[{time.time() - started:6.0f}s] {out['form']:12s} {out['phase']:9s} "
                  f"lr={out['lr']:g} seed={out['seed']} "
                  f"val_result_nll={out['validation']['result_nll']:.3f}"
                  + (f" test_result_greedy={test['result_greedy_accuracy']:.3f}" if test else ""),
                  flush=True)
            write_result(result, "show_work", device, out_file)  # after every run: resumable

    def job(form, lr, seed, phase):
        return {"form": form, "lr": lr, "seed": seed, "phase": phase, "steps": args.steps,
                "batch_size": args.batch_size}

    def best_lr(form):
        def mean_val(lr):
            vals = [r["validation"]["result_nll"] for r in result["runs"]
                    if r["form"] == form and r["lr"] == lr and r["phase"] == "selection"]
            return sum(vals) / len(vals)
        return min(grid[form], key=mean_val)

    grid = {form: list(GRID) for form in FORMS}
    result["grid"] = grid
    with ProcessPoolExecutor(args.workers, initializer=_init_worker,
                             initargs=(1, args.quick)) as pool:
        collect(pool, [job(f, lr, s, "selection") for f in FORMS for lr in grid[f]
                       for s in selection])
        for _ in range(1 if args.quick else MAX_EXTENSIONS):
            extra = [(f, lr) for f in FORMS if (lr := past_edge(grid[f], best_lr(f)))]
            for f, lr in extra:
                grid[f] = sorted(grid[f] + [lr])
            collect(pool, [job(f, lr, s, "selection") for f, lr in extra
                           for s in selection])
        result["best_lr"] = {f: best_lr(f) for f in FORMS}
        result["best_lr"][WORKED] = worked_lr
        collect(pool, [job(f, result["best_lr"][f], s, "report") for f in (*FORMS, WORKED)
                       for s in report])
    result["seconds"] = time.time() - started
    write_result(result, "show_work", device, out_file)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
