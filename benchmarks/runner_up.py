"""Chapter 8's report runs at each method's **runner-up** learning rate.

With two selection seeds the chosen rate and the runner-up (the rate with the second-lowest
mean validation loss on the result tokens) are often within the selection noise, yet the two
rates can forget very differently. EVIDENCE.md §1: where two grid points are within the
selection noise, report both. This script reads the finished sweep
(``benchmarks/results/real_sweep-<device>.json``), takes each main method's runner-up rate
from its selection runs (the grid with its extensions) and runs the report seeds there,
exactly as the sweep's report runs: ``real_sweep``'s own worker (``_run``), the same budget,
data, test scoring, per-question scores, prose and chat forgetting (against the sweep's own
chat references), intruder scores, chapter 5's ΔW analysis for full fine-tuning and the
saved q,v adapters of r = 8 and r = 64 (under ``runner_up_adapters/``). It runs no PEFT
overlay and no null: those check the implementation and the spectrum, not the rate.

Writes ``benchmarks/results/runner_up-<device>.json``: the sweep's schema (``runs`` of phase
``report``; ``best_lr`` holds the runner-up rates, ``chosen_lr`` the sweep's choices, and
``source_git_commit`` / ``source_date`` the sweep it was made from), read by
``lora_edu.sweep.Sweep.at_runner_up``. Run it from a clean commit, after the sweep:

    python benchmarks/runner_up.py             # about 15 runs, ~25 min each on 2 workers
    python benchmarks/runner_up.py --resume    # a run cut short goes on
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _provenance import RESULTS, provenance, write_result  # noqa: E402
from real_sweep import _init_worker, _key, _run  # noqa: E402

from lora_edu.repro import get_device  # noqa: E402
from lora_edu.sft import METHODS, task_data  # noqa: E402
from lora_edu.sweep import Sweep  # noqa: E402
from lora_edu.tasks import kind_of  # noqa: E402


def runner_up_jobs(sweep: Sweep, methods: list[str], seeds: list[int], steps: int,
                   batch_size: int, adapters: Path) -> list[dict]:
    """One report job per method and report seed, at the method's runner-up rate."""
    return [{"kind": "run", "method": m, "lr": sweep.runner_up_lr(m), "seed": s,
             "phase": "report", "implementation": "lora_edu", "steps": steps,
             "batch_size": batch_size, "adapters": adapters} for m in methods for s in seeds]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", type=Path, default=None,
                        help="the sweep's result (default: results/real_sweep-<device>.json)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--workers", type=int, default=2, help="processes, one thread each")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--resume", action="store_true",
                        help="keep the runs of an existing result file made at this commit "
                             "from the same sweep, and run only the missing ones")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke test: the sweep's --quick data subset (10 validation, "
                             "21 test questions), one report seed, --steps as given (use 2), "
                             "written to --out only; a partial sweep is accepted")
    parser.add_argument("--steps", type=int, default=None,
                        help="only with --quick: steps per run (default: the sweep's)")
    args = parser.parse_args()
    if args.steps is not None and not args.quick:
        parser.error("--steps is for --quick only: report runs use the sweep's budget")
    if args.quick and args.out is None:
        parser.error("--quick needs --out (a smoke test must not overwrite the result)")
    device = get_device()
    started = time.time()
    sweep_path = args.sweep or RESULTS / f"real_sweep-{device.type}.json"
    source = json.loads(sweep_path.read_text())
    sweep = Sweep(source, sweep_path)
    if not args.quick:
        if "+dirty" in (source["git_commit"] or ""):
            raise SystemExit(f"{sweep_path} was written from a dirty tree")
        # finished for this purpose: every method chosen and reported on every report seed
        # (a sweep stopped after its report runs, before its alpha=16 step, has no 'seconds')
        missing = [m for m in args.methods if m not in source["best_lr"]
                   or len(sweep.runs(m)) != len(source["report_seeds"])]
        if missing:
            raise SystemExit(f"the sweep has no chosen rate or not every report run for "
                             f"{missing}: let it finish")
    seeds = source["report_seeds"][:1] if args.quick else source["report_seeds"]
    steps = args.steps or source["steps"]
    runner_up = {m: sweep.runner_up_lr(m) for m in args.methods}
    result = {**provenance("runner_up", device), "steps": steps,
              "batch_size": source["batch_size"], "workers": args.workers,
              "selection_seeds": source["selection_seeds"], "report_seeds": seeds,
              "selection_metric": source["selection_metric"],
              "source": str(sweep_path.name), "source_git_commit": source["git_commit"],
              "source_date": source["date"], "load_average_start": os.getloadavg(),
              "grid": {m: sweep.grid(m) for m in args.methods},
              "chosen_lr": {m: sweep.selection_ranking(m)[0][0] for m in args.methods},
              "best_lr": runner_up,
              "selection_means": {m: [[lr, v] for lr, v in sweep.selection_ranking(m)]
                                  for m in args.methods},
              "truncation_stride": source["truncation_stride"],
              "data": {k: source["data"][k] for k in ("n_validation", "n_test", "test_kinds",
                                                      "validation_kinds")},
              "base": source["base"], "runs": [], "null": []}
    out_file = args.out or RESULTS / f"runner_up-{device.type}.json"
    adapters = out_file.parent / "runner_up_adapters"
    done: dict = {}
    if args.resume and out_file.exists():
        previous = json.loads(out_file.read_text())
        if (previous["git_commit"] != result["git_commit"] or "+dirty" in result["git_commit"]
                or previous["source_date"] != result["source_date"]):
            raise SystemExit(f"--resume needs a result of this same clean commit and sweep; "
                             f"{out_file} is from {previous['git_commit']}")
        done = {_key(r): r for r in previous["runs"]}
        result["resumed_from"] = previous["date"]
        print(f"resuming: {len(done)} runs already done", flush=True)
    jobs = runner_up_jobs(sweep, args.methods, seeds, steps, source["batch_size"], adapters)
    result["runs"] = [done[_key(j)] for j in jobs if _key(j) in done]
    todo = [j for j in jobs if _key(j) not in done]
    print("runner-up rates: " + ", ".join(f"{m} {lr:g} (chosen {result['chosen_lr'][m]:g})"
                                          for m, lr in runner_up.items()), flush=True)
    chat = [tuple(p) for p in source["data"]["chat"]]
    if not args.quick:  # the workers rebuild the data: it must be the sweep's
        kinds = [kind_of(e) for e in task_data(chat=chat)["test"]]
        if kinds != source["data"]["test_kinds"]:
            raise SystemExit("this commit's test set differs from the sweep's")
    with ProcessPoolExecutor(args.workers, initializer=_init_worker,
                             initargs=(1, chat, args.quick)) as pool:
        futures = [pool.submit(_run, j) for j in todo]
        for f in as_completed(futures):
            out = f.result()
            out.pop("kind")
            result["runs"].append(out)
            print(f"[{time.time() - started:6.0f}s] {out['method']:14s} lr={out['lr']:g} "
                  f"seed={out['seed']} test_EM={out['test']['exact_match']:.3f} "
                  f"test_result_nll={out['test']['result_nll']:.3f} "
                  f"prose={out['prose_loss']:.4f} ({out['seconds']:.0f}s)", flush=True)
            write_result(result, "runner_up", device, out_file)
    result["seconds"] = time.time() - started
    result["load_average_end"] = os.getloadavg()
    write_result(result, "runner_up", device, out_file)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
