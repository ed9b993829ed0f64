"""Chapter 8's sweep on the real model: learning rates chosen on validation with selection
seeds, results reported on a 1,050-question test set with fresh seeds.

Fine-tunes SmolLM2-135M-Instruct (``lora_edu.pretrained``) on date arithmetic
(``lora_edu.tasks``) with full fine-tuning and LoRA (q,v at r = 1, 8, 64; all-linear at r = 8),
following ``shared/EVIDENCE.md``:

1. **selection**: every method at every learning rate of its grid with the selection seeds;
   the best rate is the lowest mean *validation* loss on the result tokens, and a grid whose
   best lies at its edge grows one rung past that edge (at most twice);
2. **report**: each method at its best rate with the report seeds, which took no part in the
   choice, scored on the stratified test set (per question: exact match under teacher forcing,
   the start date, the result, the result's log loss) and on forgetting (prose, chat);
   the best LoRA q,v r=8 through PEFT with the same seeds (the overlay);
3. **how the best rate moves with rank**: q,v LoRA at r = 1 and 64 with α fixed at 16
   (selection seeds only), beside the α = 2r methods of step 1;
4. for chapter 5: every reported full fine-tuning run's ΔW spectra and the test scores of its
   rank-r cuts (every 4th test question); a null: full fine-tuning of the same recipe on
   prose continuation, with the report seeds;
5. for chapter 9: the q,v adapters of the reported r = 8 and r = 64 runs (fp16), and for every
   reported run the intruder-dimension scores of its W_q and W_v (Shuttleworth et al. 2024).

Runs go to worker processes with one thread each (two workers suit two cores). The result
file is rewritten after every run, so a partial sweep can be read.

Writes ``benchmarks/results/real_sweep-<device>.json`` (adapters under
``benchmarks/results/real_sweep_adapters/``). Run it from a clean commit:

    python benchmarks/real_sweep.py
"""

from __future__ import annotations

import argparse
import copy
import itertools
import os
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _provenance import RESULTS, provenance, write_result  # noqa: E402

from lora_edu.adapters import save_adapter  # noqa: E402
from lora_edu.pretrained import load_smollm2  # noqa: E402
from lora_edu.repro import get_device  # noqa: E402
from lora_edu.sft import (ALPHA_FIXED, METHODS, SFTConfig, chat_loss, chat_references,  # noqa: E402
                          prepare_method, prose_examples, prose_loss, run_method,
                          score_examples, summarise_scores, task_data, train_sft)
from lora_edu.tasks import kind_of, natural_kind_shares  # noqa: E402

#: Seeds that choose the learning rate, and fresh seeds that report the result (disjoint).
SELECTION_SEEDS = (0, 1)
REPORT_SEEDS = (10, 11, 12)
#: Peak learning rates tried first, a factor √10 apart, placed around each method's best of
#: the previous (40- and 80-step) sweeps; a grid whose best is at its edge grows.
GRID = {"full": [1e-4, 3e-4, 1e-3], "lora_qv_r1": [1e-3, 3e-3, 1e-2],
        "lora_qv_r8": [1e-3, 3e-3, 1e-2], "lora_qv_r64": [3e-4, 1e-3, 3e-3],
        "lora_all_r8": [1e-3, 3e-3, 1e-2],
        # α = 16 instead of 2r: s = 16/r is 8× larger at r = 1 and 8× smaller at r = 64
        "lora_qv_r1_alpha16": [1e-4, 3e-4, 1e-3], "lora_qv_r64_alpha16": [3e-3, 1e-2, 3e-2]}
MAX_EXTENSIONS = 2
TRUNCATION_RANKS = [1, 8, 64]
TRUNCATION_STRIDE = 4      # every 4th test question (all kinds) is scored for each rank-r cut
QV = ("q_proj", "v_proj")
SAVE_ADAPTERS = ("lora_qv_r8", "lora_qv_r64")
INTRUDER_TOP = 10          # top singular vectors of the tuned W checked for intruders
TOP_SINGULAR_VALUES = 64

#: The learning rates a grid may grow into: 1 and 3 times each power of ten.
LADDER = [float(f"{m}e{e}") for e in range(-7, 0) for m in (1, 3)]


def past_edge(grid: list[float], best: float) -> float | None:
    """The next rung of :data:`LADDER` beyond ``grid``'s edge if ``best`` lies on that edge,
    else ``None``."""
    lrs = sorted(grid)
    if best not in (lrs[0], lrs[-1]):
        return None
    step = -1 if best == lrs[0] else 1
    i = min(range(len(LADDER)), key=lambda j: abs(LADDER[j] - best)) + step
    return LADDER[i] if 0 <= i < len(LADDER) else None


def linear_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every linear weight of the decoder layers, by module name (LoRA merged in)."""
    out = {}
    for name, m in model.named_modules():
        if ".layers." not in name:
            continue
        if hasattr(m, "delta_weight") and hasattr(m, "base"):      # a lora_edu LoRALinear
            out[name] = (m.base.weight + m.delta_weight()).detach().clone()
        elif isinstance(m, torch.nn.Linear) and not name.endswith(("lora_A", "lora_B", ".base")):
            out[name] = m.weight.detach().clone()
    return out


def compact_spectrum(values: torch.Tensor) -> dict:
    """The top singular values, the energy Σσ², the count, and how many directions hold
    50, 80, 90 and 99 % of the energy (from the full spectrum)."""
    energy = values.square()
    share = energy.cumsum(0) / energy.sum()
    ranks = {f"{int(100 * q)}": int((share < q).sum()) + 1 for q in (0.5, 0.8, 0.9, 0.99)}
    return {"top": [float(f"{v:.5g}") for v in values[:TOP_SINGULAR_VALUES].tolist()],
            "energy": float(f"{energy.sum().item():.6g}"), "n": len(values),
            "energy_rank": ranks}


def compact_items(scores: dict[str, list]) -> dict:
    """Per-question scores, small: 0/1 strings for the hits, 4-digit losses."""
    bits = {k: "".join("1" if v else "0" for v in scores[k])
            for k in ("exact", "start_ok", "result_ok")}
    return {**bits, "result_nll": [round(v, 4) for v in scores["result_nll"]],
            "answer_nll": [round(v, 4) for v in scores["answer_nll"]]}


def intruder_scores(w0: dict[str, torch.Tensor], w1: dict[str, torch.Tensor]) -> dict:
    """For W_q and W_v of every layer: for each of the tuned W's top singular vectors (left
    and right), its largest |cosine| with any singular vector of W0. A vector far from all
    of W0's (below a threshold ε) is an *intruder dimension* (Shuttleworth et al. 2024)."""
    out = {}
    for name in w0:
        if not name.endswith(QV):
            continue
        u0, _, v0h = _svd0(name, w0[name])
        u1, _, v1h = torch.linalg.svd(w1[name], full_matrices=False)
        left = (u0.T @ u1[:, :INTRUDER_TOP]).abs().amax(dim=0)
        right = (v0h @ v1h[:INTRUDER_TOP].T).abs().amax(dim=0)
        out[name] = {"left": [round(v, 4) for v in left.tolist()],
                     "right": [round(v, 4) for v in right.tolist()]}
    return out


def _svd0(name: str, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The base weight's SVD, computed once per worker."""
    cache = _WORKER.setdefault("svd0", {})
    if name not in cache:
        cache[name] = torch.linalg.svd(w, full_matrices=False)
    return cache[name]


def delta_analysis(base, tuned, tokenizer, items) -> dict:
    """Chapter 5: every module's ΔW spectrum, and per-question test scores after cutting ΔW
    to rank r (q,v only, or every module)."""
    w0, w1 = linear_weights(base), linear_weights(tuned)
    svd = {n: torch.linalg.svd(w1[n] - w0[n], full_matrices=False) for n in w0}
    out = {"spectra": {n: compact_spectrum(s) for n, (_, s, _) in svd.items()},
           "truncated": {}}
    probe = copy.deepcopy(base)
    modules = dict(probe.named_modules())
    for scope in ("qv", "all"):
        for r in TRUNCATION_RANKS:
            with torch.no_grad():
                for n in w0:
                    u, s, vh = svd[n]
                    keep = scope == "all" or n.endswith(QV)
                    modules[n].weight.copy_(w0[n] + ((u[:, :r] * s[:r]) @ vh[:r] if keep else 0))
            out["truncated"][f"{scope}_r{r}"] = compact_items(
                score_examples(probe, tokenizer, items))
    return out


_WORKER: dict = {}


def _key(run: dict) -> tuple:
    """What identifies a run (or a job) of the sweep."""
    return (run["method"], run["implementation"], run["lr"], run["seed"], run["phase"])


def _init_worker(threads: int, chat: list, quick: bool) -> None:
    """Each worker process loads the model and the data once."""
    torch.set_num_threads(threads)
    base, tokenizer = load_smollm2()
    data = task_data(chat=chat)
    if quick:
        data = {**data, "validation": data["validation"][::20], "test": data["test"][::50]}
    _WORKER.update(base=base, tokenizer=tokenizer, data=data)


def _null(job: dict) -> dict:
    """ΔW spectra of full fine-tuning with the task's own recipe on prose continuation."""
    base, tokenizer = _WORKER["base"], _WORKER["tokenizer"]
    model = prepare_method(base, "full", job["seed"])
    texts = prose_examples(len(_WORKER["data"]["train"]))
    train_sft(model, tokenizer, texts, SFTConfig(
        steps=job["steps"], batch_size=job["batch_size"], lr=job["lr"],
        warmup_steps=max(1, job["steps"] // 10), seed=job["seed"], show_progress=False))
    w0, w1 = linear_weights(base), linear_weights(model)
    return {"kind": "null", "lr": job["lr"], "seed": job["seed"],
            "spectra": {n: compact_spectrum(torch.linalg.svdvals(w1[n] - w0[n])) for n in w0}}


def _run(job: dict) -> dict:
    """One run of the sweep in a worker: train, score, and the chapter 5 / 9 extras."""
    started = time.time()
    if job["kind"] == "null":
        return {**_null(job), "seconds": time.time() - started}
    base, tokenizer, data = _WORKER["base"], _WORKER["tokenizer"], _WORKER["data"]
    method, lr, seed, impl = job["method"], job["lr"], job["seed"], job["implementation"]
    report = job["phase"] == "report"
    record = run_method(base, tokenizer, method, lr, seed, data, job["steps"],
                        job["batch_size"], impl, keep_model=report,
                        evaluate=("validation", "test") if report else ("validation",),
                        keep_items=("validation", "test") if report else ())
    for split in ("validation", "test"):
        if f"{split}_items" in record:
            scores = record.pop(f"{split}_items")
            record[f"{split}_items"] = compact_items(scores)
    record["phase"] = job["phase"]
    if report:
        model = record.pop("model")
        merged = model
        if impl == "peft":
            merged = copy.deepcopy(model).merge_and_unload()
        w0, w1 = linear_weights(base), linear_weights(merged)
        record["intruders"] = intruder_scores(w0, w1)
        if method == "full":
            record["delta"] = delta_analysis(base, model, tokenizer,
                                             data["test"][::TRUNCATION_STRIDE])
        if impl == "lora_edu" and method in SAVE_ADAPTERS:
            for _, layer in model.named_modules():
                if hasattr(layer, "lora_A"):
                    layer.lora_A.data = layer.lora_A.data.half()
                    layer.lora_B.data = layer.lora_B.data.half()
            save_adapter(model, job["adapters"] / f"{method}_lr{lr:g}_seed{seed}")
    record["seconds"] = time.time() - started
    return {"kind": "run", **record}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2, help="processes, one thread each")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--resume", action="store_true",
                        help="keep the runs of an existing result file made at this commit and "
                             "run only the missing ones (a sweep cut short goes on)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke test: 10 validation and 21 test questions, one "
                             "selection and one report seed, one extension")
    args = parser.parse_args()
    from concurrent.futures import ProcessPoolExecutor, as_completed

    device = get_device()
    started = time.time()
    selection = SELECTION_SEEDS[:1] if args.quick else SELECTION_SEEDS
    report = REPORT_SEEDS[:1] if args.quick else REPORT_SEEDS
    result = {**provenance("real_sweep", device), "steps": args.steps,
              "batch_size": args.batch_size, "workers": args.workers,
              "selection_seeds": list(selection), "report_seeds": list(report),
              "selection_metric": "mean over selection seeds of validation result_nll",
              "load_average_start": os.getloadavg(), "grid": {m: list(g) for m, g in GRID.items()},
              "max_extensions": MAX_EXTENSIONS, "truncation_stride": TRUNCATION_STRIDE,
              "runs": [], "null": []}
    adapters = (args.out.parent if args.out else RESULTS) / "real_sweep_adapters"
    common = {"steps": args.steps, "batch_size": args.batch_size, "adapters": adapters}
    out_path = args.out

    out_file = out_path or RESULTS / f"real_sweep-{device.type}.json"
    done: dict = {}
    if args.resume and out_file.exists():
        import json

        previous = json.loads(out_file.read_text())
        if previous["git_commit"] != result["git_commit"] or "+dirty" in result["git_commit"]:
            raise SystemExit(f"--resume needs the result of this same clean commit; "
                             f"{out_file} is from {previous['git_commit']}")
        done = {_key(r): r for r in previous["runs"]}
        done.update({("null", n["seed"]): n for n in previous["null"]})
        result["resumed_from"] = previous["date"]
        print(f"resuming: {len(done)} runs already done", flush=True)
    elif adapters.exists() and not args.quick:
        shutil.rmtree(adapters)  # the adapters of an earlier sweep would be read as this one's
    base, tokenizer = load_smollm2()
    chat = chat_references(base, tokenizer)
    data = task_data(chat=chat)
    if args.quick:
        data = {**data, "validation": data["validation"][::20], "test": data["test"][::50]}
    scores = {s: score_examples(base, tokenizer, data[s]) for s in ("validation", "test")}
    result["data"] = {"n_train": len(data["train"]), "n_validation": len(data["validation"]),
                      "n_test": len(data["test"]),
                      "test_kinds": [kind_of(e) for e in data["test"]],
                      "validation_kinds": [kind_of(e) for e in data["validation"]],
                      "n_answer_tokens": scores["test"]["n_answer"],
                      "n_result_tokens": scores["test"]["n_result"],
                      "natural_kind_shares": natural_kind_shares(), "chat": chat}
    result["base"] = {"validation": summarise_scores(scores["validation"]),
                      "test": summarise_scores(scores["test"]),
                      "validation_items": compact_items(scores["validation"]),
                      "test_items": compact_items(scores["test"]),
                      "prose_loss": prose_loss(base, tokenizer, data["prose"]),
                      "chat_loss": chat_loss(base, tokenizer, chat)}
    del base

    def job(method, lr, seed, phase, implementation="lora_edu"):
        return {"kind": "run", "method": method, "lr": lr, "seed": seed, "phase": phase,
                "implementation": implementation, **common}

    def mean_val(method, lr):
        vals = [r["validation"]["result_nll"] for r in result["runs"]
                if r["method"] == method and r["lr"] == lr and r["phase"] == "selection"]
        return sum(vals) / len(vals)

    def best_lr(method):
        return min(grid[method], key=lambda lr: mean_val(method, lr))

    def collect(pool, jobs):
        outs = []
        for j in jobs:  # runs a resumed sweep already has are taken from its file
            key = ("null", j["seed"]) if j["kind"] == "null" else _key(j)
            if key in done:
                outs.append({"kind": j["kind"], **done.pop(key)})
        futures = [pool.submit(_run, j) for j in jobs
                   if (("null", j["seed"]) if j["kind"] == "null" else _key(j)) not in
                   {("null", o["seed"]) if o["kind"] == "null" else _key(o) for o in outs}]
        for out in itertools.chain(outs, (f.result() for f in as_completed(futures))):
            kind = out.pop("kind")
            if kind == "null":
                result["null"].append(out)
                print(f"[{time.time() - started:6.0f}s] null seed={out['seed']}", flush=True)
            else:
                result["runs"].append(out)
                test = out.get("test", {})
                print(f"[{time.time() - started:6.0f}s] {out['phase']:9s} {out['method']:20s} "
                      f"{out['implementation']:8s} lr={out['lr']:g} seed={out['seed']} "
                      f"val_result_nll={out['validation']['result_nll']:.3f} "
                      f"val_EM={out['validation']['exact_match']:.3f} "
                      + (f"test_EM={test['exact_match']:.3f} " if test else "")
                      + f"prose={out['prose_loss']:.4f} chat={out['chat_loss']:.3f} "
                      f"({out['seconds']:.0f}s)", flush=True)
            write_result(result, "real_sweep", device, out_path)

    def select(pool, methods):
        """Selection seeds on every rung, then grow grids whose best is at an edge."""
        collect(pool, [job(m, lr, s, "selection") for m in methods for lr in grid[m]
                       for s in selection])
        for _ in range(1 if args.quick else MAX_EXTENSIONS):
            extra = [(m, lr) for m in methods if (lr := past_edge(grid[m], best_lr(m)))]
            for m, lr in extra:
                grid[m] = sorted(grid[m] + [lr])
            collect(pool, [job(m, lr, s, "selection") for m, lr in extra for s in selection])
        for m in methods:
            result["best_lr"][m] = best_lr(m)

    grid = {m: list(g) for m, g in GRID.items()}
    result["grid"] = grid
    result["best_lr"] = {}
    with ProcessPoolExecutor(args.workers, initializer=_init_worker,
                             initargs=(1, chat, args.quick)) as pool:
        main_methods = list(METHODS)
        select(pool, main_methods)                                   # 1. selection
        best = result["best_lr"]
        jobs = [job(m, best[m], s, "report") for m in main_methods for s in report]
        jobs += [job("lora_qv_r8", best["lora_qv_r8"], s, "report", "peft") for s in report]
        jobs += [{"kind": "null", "lr": best["full"], "seed": s, **common} for s in report]
        collect(pool, jobs)                                          # 2. and 4.
        select(pool, list(ALPHA_FIXED))                              # 3.
    result["seconds"] = time.time() - started
    result["load_average_end"] = os.getloadavg()
    write_result(result, "real_sweep", device, out_path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
