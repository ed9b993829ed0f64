"""Chapter 8's sweep on the real model: each method at its own learning rate, several seeds.

Fine-tunes SmolLM2-135M-Instruct (``lora_edu.pretrained``) on date arithmetic
(``lora_edu.tasks``) with full fine-tuning and LoRA (q,v at r = 1, 8, 64; all-linear at r = 8):

1. every method at three learning rates, seed 0; the best is the lowest *validation* loss,
   and a grid whose best lies at its edge grows past that edge until the best is inside;
2. two more seeds at each method's best learning rate;
3. the best LoRA-q,v r=8 configuration through PEFT, three seeds (the overlay);
4. for chapter 5: for every full fine-tuning run, the singular values of each module's ΔW and
   the test loss after truncating ΔW to rank r (q,v only, and all modules); and a null: ΔW of
   full fine-tuning at the same settings on general prose instead of the task;
5. for chapter 9: the q,v adapters of the r = 8 and r = 64 runs, saved in fp16.

Runs go to worker processes with one thread each (two workers suit two cores).

Writes ``benchmarks/results/real_sweep-<device>.json`` (and adapters under
``benchmarks/results/real_sweep_adapters/``). About 100 minutes on two CPU cores; the
chapter re-runs one configuration live and checks it lands inside the committed seed band.

    python benchmarks/real_sweep.py
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _provenance import RESULTS, provenance, write_result  # noqa: E402

from lora_edu.adapters import save_adapter  # noqa: E402
from lora_edu.pretrained import load_smollm2  # noqa: E402
from lora_edu.repro import get_device, seed_all  # noqa: E402
from lora_edu.sft import METHODS, answer_loss, prose_texts, run_method, task_data  # noqa: E402

#: Peak learning rates tried first (seed 0), about a factor √10 apart. Where the best lies at an edge
#: of its grid, the grid grows one step past that edge (at most MAX_EXTENSIONS times), so that
#: every chosen rate is an interior optimum and not an artefact of where the grid stopped.
GRID = {"full": [3e-5, 1e-4, 3e-4], "lora_qv_r1": [1e-3, 3e-3, 1e-2],
        "lora_qv_r8": [1e-3, 3e-3, 1e-2], "lora_qv_r64": [3e-4, 1e-3, 3e-3],
        "lora_all_r8": [3e-4, 1e-3, 3e-3]}
MAX_EXTENSIONS = 2
TRUNCATION_RANKS = [1, 8, 64]
QV = ("q_proj", "v_proj")


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
    """Every adapted-able linear weight of the decoder layers, by module name."""
    return {n: m.weight.detach().clone() for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and ".layers." in n}


#: Singular values kept per module in the committed JSON (with the total energy, so that the
#: share of ‖ΔW‖²_F in the top r is exact for every r up to this).
TOP_SINGULAR_VALUES = 64


def compact_spectrum(values: list[float]) -> dict:
    """The top singular values, the total energy Σσ² and the count, rounded to 5 digits."""
    return {"top": [float(f"{v:.5g}") for v in values[:TOP_SINGULAR_VALUES]],
            "energy": float(f"{sum(v * v for v in values):.6g}"), "n": len(values)}


def compact(result: dict) -> dict:
    """Shrink every spectrum of ``result["chapter5"]`` with :func:`compact_spectrum`."""
    ch5 = result.get("chapter5", {})
    for entry in ch5.get("full", []) + ([ch5["prose_null"]] if "prose_null" in ch5 else []):
        entry["spectra"] = {n: v if isinstance(v, dict) else compact_spectrum(v)
                            for n, v in entry["spectra"].items()}
    return result


def delta_analysis(base: torch.nn.Module, tuned: torch.nn.Module, tokenizer, data) -> dict:
    """Singular values of every module's ΔW and the test loss of rank-r truncations."""
    w0, w1 = linear_weights(base), linear_weights(tuned)
    svd = {n: torch.linalg.svd(w1[n] - w0[n], full_matrices=False) for n in w0}
    spectra = {n: s.tolist() for n, (_, s, _) in svd.items()}
    out = {"spectra": spectra, "truncated_test_loss": {}}
    probe = copy.deepcopy(base)
    modules = dict(probe.named_modules())
    for scope in ("qv", "all"):
        for r in TRUNCATION_RANKS:
            with torch.no_grad():
                for n in w0:
                    keep = scope == "all" or n.endswith(QV)
                    u, s, vh = svd[n]
                    delta = (u[:, :r] * s[:r]) @ vh[:r] if keep else 0
                    modules[n].weight.copy_(w0[n] + delta)
            out["truncated_test_loss"][f"{scope}_r{r}"] = answer_loss(probe, tokenizer,
                                                                       data["test"])
    return out


def prose_null(base, tokenizer, lr: float, steps: int, batch_size: int, seed: int) -> dict:
    """ΔW spectra of full fine-tuning on general prose (the null: an update with no task)."""
    model = copy.deepcopy(base).requires_grad_(True).train()
    texts = prose_texts(steps * batch_size + 16, chars=120)[16:]  # not the evaluation passages
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    seed_all(seed)
    for step in range(steps):
        batch = tokenizer(texts[step * batch_size:(step + 1) * batch_size], return_tensors="pt",
                          padding=True, truncation=True, max_length=32)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    w0, w1 = linear_weights(base), linear_weights(model)
    return {n: torch.linalg.svdvals(w1[n] - w0[n]).tolist() for n in w0}


_WORKER: dict = {}


def _init_worker(threads: int) -> None:
    """Each worker process loads the model and the data once."""
    torch.set_num_threads(threads)
    base, tokenizer = load_smollm2()
    _WORKER.update(base=base, tokenizer=tokenizer, data=task_data())


def _run(job: dict) -> dict:
    """One run of the sweep in a worker: train, score, and the chapter 5 / 9 extras."""
    base, tokenizer, data = _WORKER["base"], _WORKER["tokenizer"], _WORKER["data"]
    if job["kind"] == "prose_null":
        return {"kind": "prose_null", "lr": job["lr"], "seed": job["seed"],
                "spectra": prose_null(base, tokenizer, job["lr"], job["steps"],
                                      job["batch_size"], job["seed"])}
    method, lr, seed, impl = job["method"], job["lr"], job["seed"], job["implementation"]
    record = run_method(base, tokenizer, method, lr, seed, data, job["steps"],
                        job["batch_size"], impl, keep_model=True)
    model = record.pop("model")
    if method == "full":
        record["delta"] = delta_analysis(base, model, tokenizer, data)
    if impl == "lora_edu" and method in ("lora_qv_r8", "lora_qv_r64"):
        for _, layer in model.named_modules():
            if hasattr(layer, "lora_A"):
                layer.lora_A.data = layer.lora_A.data.half()
                layer.lora_B.data = layer.lora_B.data.half()
        save_adapter(model, job["adapters"] / f"{method}_lr{lr:g}_seed{seed}")
    return {"kind": "run", **record}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="processes, one thread each")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--compact", type=Path, default=None, metavar="JSON",
                        help="only shrink the spectra of an existing result file in place")
    args = parser.parse_args()
    if args.compact:
        import json
        args.compact.write_text(json.dumps(compact(json.loads(args.compact.read_text())),
                                           indent=2) + "\n")
        return 0
    from concurrent.futures import ProcessPoolExecutor

    from lora_edu.sft import exact_match, prose_loss

    device = get_device()
    started = time.time()
    result = {**provenance("real_sweep", device), "steps": args.steps,
              "batch_size": args.batch_size, "workers": args.workers, "grid": GRID,
              "max_extensions": MAX_EXTENSIONS,
              "runs": [], "chapter5": {"full": []}}
    adapters = (args.out.parent if args.out else RESULTS) / "real_sweep_adapters"
    common = {"steps": args.steps, "batch_size": args.batch_size, "adapters": adapters}

    def job(method, lr, seed, implementation="lora_edu"):
        return {"kind": "run", "method": method, "lr": lr, "seed": seed,
                "implementation": implementation, **common}

    def best_lr(method):
        return min((r for r in result["runs"] if r["method"] == method and r["seed"] == 0
                    and r["implementation"] == "lora_edu"), key=lambda r: r["val_loss"])["lr"]

    def collect(pool, jobs):
        for job, out in zip(jobs, pool.map(_run, jobs)):
            if out["kind"] == "prose_null":
                result["chapter5"]["prose_null"] = {k: out[k] for k in ("lr", "seed", "spectra")}
                continue
            out.pop("kind")
            delta = out.pop("delta", None)
            if delta is not None:
                result["chapter5"]["full"].append({"lr": out["lr"], "seed": out["seed"], **delta})
            result["runs"].append(out)
            print(f"[{time.time() - started:6.0f}s] {out['method']:12s} "
                  f"{out['implementation']:8s} lr={out['lr']:g} seed={out['seed']} "
                  f"val={out['val_loss']:.3f} test={out['test_loss']:.3f} "
                  f"EM={out['test_exact_match']:.3f} prose={out['prose_loss']:.4f} "
                  f"step={out['median_step_seconds']:.2f}s", flush=True)
        write_result(compact(result), "real_sweep", device, args.out)

    with ProcessPoolExecutor(args.workers, initializer=_init_worker,
                             initargs=(1,)) as pool:
        base, tokenizer = load_smollm2()
        data = task_data()
        result["base"] = {"test_loss": answer_loss(base, tokenizer, data["test"]),
                          "test_exact_match": exact_match(base, tokenizer, data["test"]),
                          "prose_loss": prose_loss(base, tokenizer, data["prose"])}
        del base
        grid = {m: list(lrs) for m, lrs in GRID.items()}
        result["grid"] = grid
        # full fine-tuning first: its runs are the longest, so the two workers finish together
        collect(pool, [job(m, lr, 0) for m in METHODS for lr in grid[m]])
        for _ in range(MAX_EXTENSIONS):
            extra = [(m, lr) for m in METHODS if (lr := past_edge(grid[m], best_lr(m)))]
            for m, lr in extra:
                grid[m] = sorted(grid[m] + [lr])
            collect(pool, [job(m, lr, 0) for m, lr in extra])
        best = {m: best_lr(m) for m in METHODS}
        result["best_lr"] = best
        more = [job(m, best[m], seed) for seed in range(1, args.seeds) for m in METHODS]
        more += [job("lora_qv_r8", best["lora_qv_r8"], seed, "peft") for seed in range(args.seeds)]
        more.append({"kind": "prose_null", "lr": best["full"], "seed": 0, **common})
        collect(pool, more)
    result["seconds"] = time.time() - started
    write_result(compact(result), "real_sweep", device, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
