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

``--evaluate`` trains nothing either: it combines the committed adapters and scores the
combinations, as chapter 12 reports them (``benchmarks/results/combine_tasks-eval-<device>.json``):

* two designs: **independent** pairs (``reverse-s{i}`` with ``shift-s{i+1}``: different seeds,
  so different initial A) and the **shared**-start control (``reverse-s{i}`` with
  ``shift-s{i}``: one seed, one initial A for both tasks), the control for
  :data:`CONTROL_METHODS`;
* every combination type of :data:`METHODS` gets its overall scale λ (``W0 + λ ΔW``) chosen on
  a **validation** split with the **selection seeds** 0–2, separately on each measure of
  :data:`MEASURES` (mean per-token accuracy and mean greedy exact match over both tasks): the
  grid :data:`LAMBDAS` is extended by √2 while either measure's best λ is at its edge, and the
  final grid is recorded;
* at each measure's chosen λ and its runner-up (second best on validation) it is scored on a
  **test** split with the fresh **report seeds** 3–5, per prompt (answer tokens right, so
  exact match and per-token accuracy), beside each adapter alone and the base model, so that a
  verdict can be checked at the near-tied λ. Validation and test prompts are disjoint from
  every adapter's training data.

    python benchmarks/combine_tasks.py --seeds 3 4 5 --result \
        benchmarks/results/combine_tasks-seed3-5-cpu.json      # the fresh report adapters
    python benchmarks/combine_tasks.py --evaluate --lock /tmp/lora_cpu.lock   # the evaluation
    python benchmarks/combine_tasks.py --evaluate --n-val 8 --n-test 8 --methods cat ties \
        --lambdas 1 2 --result /tmp/x.json                      # a quick try

``--evaluate-grid`` scores the report pairs on the test split at **every** λ of each type's
final validation grid that the committed evaluation did not score (it scored the chosen λ and
the runner-up), so that a verdict can be checked at every λ validation cannot tell from the
chosen one (``benchmarks/results/combine_tasks-eval-grid-<device>.json``; the same prompts,
pairs and DARE draws; the evaluation it extends is named in ``source_git_commit``):

    python benchmarks/combine_tasks.py --evaluate-grid

``--lock PATH`` holds an exclusive ``flock`` on PATH while one combination type of one design
is chosen and scored (a few minutes) and releases it between them (a machine shared with other
heavy jobs).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _provenance import RESULTS, provenance, write_result  # noqa: E402

from lora_edu.adapters import PEFT_WEIGHTS_NAME, save_peft_adapter  # noqa: E402
from lora_edu.combine import (SVD_TYPES, answer_items, combine_named_adapters,  # noqa: E402
                              merged, read_adapter)
from lora_edu.letter_tasks import (TASKS, answer_loss, make_examples, encode_task,  # noqa: E402
                                   teacher_forced_scores)
from lora_edu.lora import LoraConfig, inject_lora, lora_layers  # noqa: E402
from lora_edu.pretrained import load_smollm2  # noqa: E402
from lora_edu.repro import get_device, seed_all  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "src" / "lora_edu" / "assets" / "combine"
#: The evaluation sets (the chapter draws the same ones): seed and size per task.
EVAL_SEED, EVAL_N = 1000, 128
#: --evaluate: λ is chosen with the selection seeds, reported with the fresh report seeds.
SELECT_SEEDS, REPORT_SEEDS = (0, 1, 2), (3, 4, 5)
DESIGNS = ("independent", "shared")
#: The combination types compared: task arithmetic exact (cat) and re-compressed (svd), PEFT's
#: factor-wise linear and ties, and TIES / DARE on the full updates.
METHODS = ("linear", "cat", "svd", "ties", "ties_svd", "dare_linear_svd", "dare_ties_svd")
#: The shared-start control repeats the types whose arithmetic is or is not basis-dependent.
CONTROL_METHODS = ("linear", "cat", "svd", "ties", "ties_svd")
#: The λ grid every type starts from (a factor √2 apart), extended while the best is at an edge.
LAMBDAS = (0.35, 0.5, 0.7, 1.0, 1.4)
DENSITY, SVD_RANK = 0.5, 8
#: Every answer of the letter tasks is 5 tokens (5 letters, one token each).
ANSWER_TOKENS = 5
VAL_SEED, TEST_SEED = 2000, 3000


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
    parser.add_argument("--evaluate", action="store_true",
                        help="combine the committed adapters and score them (no training)")
    parser.add_argument("--evaluate-grid", action="store_true",
                        help="score the test split at every λ of the committed evaluation's "
                             "grids that it did not score (no training)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--designs", nargs="+", default=list(DESIGNS), choices=DESIGNS)
    parser.add_argument("--lambdas", type=float, nargs="+", default=list(LAMBDAS))
    parser.add_argument("--control-methods", nargs="+", default=list(CONTROL_METHODS),
                        help="the types the shared-start control repeats")
    parser.add_argument("--n-val", type=int, default=64, help="validation prompts per task")
    parser.add_argument("--n-test", type=int, default=256, help="test prompts per task")
    parser.add_argument("--adapters", type=Path, default=ASSETS,
                        help="with --evaluate: the directory of the adapters to combine")
    parser.add_argument("--threads", type=int, default=1,
                        help="with --evaluate on a CPU: torch threads (accuracies only)")
    parser.add_argument("--lock", type=Path, default=None,
                        help="flock this file while each configuration is scored")
    args = parser.parse_args()
    if args.from_log:
        return record_from_log(args)
    if args.evaluate:
        return evaluate(args)
    if args.evaluate_grid:
        return evaluate_grid(args)
    torch.set_num_threads(1 if get_device().type == "cpu" else torch.get_num_threads())
    device = get_device()
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
    # provenance's git_commit carries "+dirty" when the tree had uncommitted changes
    result = {**provenance("combine_tasks", device),
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
    result = provenance("combine_tasks", device)
    result = {**result, "git_commit": args.train_commit or result["git_commit"],
              "settings": settings(args, config), "base_scores": base, "adapters": adapters,
              "note": "the training run (python benchmarks/combine_tasks.py, every default) "
                      "was stopped on a shared, overloaded 2-core machine after the adapters "
                      f"listed here ({', '.join(adapters)}); this file was written from its "
                      "printed log by the command below, and `date` is when it was written",
              "train_log": lines}
    write_result(result, "combine_tasks", device, out=args.result)
    return 0


# --------------------------------------------------------------------------- --evaluate

def pairs(design: str, seeds: tuple[int, ...]) -> list[tuple[str, str]]:
    """The (reverse, shift) adapter pairs of a design: ``shared`` pairs one seed's two adapters
    (one initial A), ``independent`` pairs seed i's reverse with seed i+1's shift."""
    if design == "shared":
        return [(f"reverse-s{s}", f"shift-s{s}") for s in seeds]
    return [(f"reverse-s{seeds[i]}", f"shift-s{seeds[(i + 1) % len(seeds)]}")
            for i in range(len(seeds))]


def heldout_examples(n_val: int, n_test: int, steps: int = 40, batch_size: int = 16
                     ) -> dict[str, dict[str, list[tuple[str, str]]]]:
    """Validation and test prompts per task, disjoint from each other and from the training
    examples of every seed (regenerated exactly as :func:`train_one` drew them)."""
    out = {}
    for task in TASKS:
        eval_examples = make_examples(task, EVAL_N, seed=EVAL_SEED)
        trained = [ex for seed in (*SELECT_SEEDS, *REPORT_SEEDS)
                   for ex in make_examples(task, steps * batch_size, seed=seed,
                                           exclude=eval_examples)]
        val = make_examples(task, n_val, seed=VAL_SEED, exclude=trained)
        test = make_examples(task, n_test, seed=TEST_SEED, exclude=trained + val)
        out[task] = {"validation": val, "test": test}
    return out


@contextlib.contextmanager
def cpu_lock(path: Path | None):
    """Hold an exclusive flock on ``path`` (if given) for the length of the block."""
    if path is None:
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def score(model, batches: dict, adapter=None, scale: float = 1.0) -> dict:
    """Per task: per-prompt answer tokens right (``hits``) and mean loss, with ``adapter``
    merged at ``scale`` (``None``: the base model)."""
    ctx = merged(model, adapter, scale) if adapter else contextlib.nullcontext()
    with ctx:
        return {task: answer_items(model, batch) for task, batch in batches.items()}


def scored_items(model, batches: dict, adapter=None, scale: float = 1.0) -> dict:
    """:func:`score` as the result files keep it: per task, the per-prompt hits as a digit
    string and the mean loss."""
    return {task: {"hits": hits_string(got["hits"]), "loss": float(got["loss"].mean())}
            for task, got in score(model, batches, adapter, scale).items()}


def summary(items: dict) -> dict:
    """Exact match, per-token accuracy and loss per task from :func:`score`'s items."""
    out = {}
    for task, got in items.items():
        hits = got["hits"]
        out[task] = {"exact_match": float((hits == ANSWER_TOKENS).float().mean()),
                     "token_accuracy": float(hits.float().mean() / ANSWER_TOKENS),
                     "loss": float(got["loss"].mean())}
    return out


def combination(adapters: dict, pair: tuple[str, str], method: str, index: int) -> dict:
    """One pair's combined adapter (weights 1 and 1; λ is applied when merging)."""
    return combine_named_adapters(
        adapters, {pair[0]: 1.0, pair[1]: 1.0}, method, density=DENSITY,
        rank=SVD_RANK if method in SVD_TYPES else None,
        generator=torch.Generator().manual_seed(1000 + index))


#: The validation measures λ is chosen on, each separately: its verdicts are stated on the
#: measure their λ was chosen on. The second element of each key breaks ties.
MEASURES = ("token_accuracy", "exact_match")
#: Extension stops at these bounds (a factor 2^6 from λ = 1 either way), recorded as an edge.
LAMBDA_BOUNDS = (2.0 ** -6, 2.0 ** 4)


def choose_lambda(model, adapters, batches, design, method, grid) -> dict:
    """Score the λ grid on validation with the selection pairs, and extend it (a factor √2 per
    step) while the best λ on either measure of :data:`MEASURES` is at an edge of the grid;
    return every point and, per measure, the chosen λ and the runner-up (second best)."""
    combos = [combination(adapters, p, method, i)
              for i, p in enumerate(pairs(design, SELECT_SEEDS))]
    points: dict[float, list] = {}

    def run(lam: float) -> None:
        lam = round(lam, 4)
        if lam not in points:
            points[lam] = [summary(score(model, batches, c, lam)) for c in combos]
            tok, em = _val_key(points[lam], "token_accuracy")
            print(f"  {design:11s} {method:15s} λ={lam:<7g} validation: token accuracy "
                  f"{tok:.3f}, exact match {em:.3f}", flush=True)

    for lam in grid:
        run(lam)
    while True:
        lams, grow = sorted(points), None
        for measure in MEASURES:
            best = max(lams, key=lambda x: _val_key(points[x], measure))
            if best == lams[-1] and best * 2 ** 0.5 <= LAMBDA_BOUNDS[1]:
                grow = best * 2 ** 0.5
            elif best == lams[0] and best / 2 ** 0.5 >= LAMBDA_BOUNDS[0]:
                grow = best / 2 ** 0.5
            if grow is not None:
                break
        if grow is None:
            break
        run(grow)
    lams = sorted(points)
    by = {}
    for measure in MEASURES:
        ranked = sorted(lams, key=lambda x: _val_key(points[x], measure), reverse=True)
        by[measure] = {"chosen": ranked[0], "runner_up": ranked[1],
                       "at_edge": ranked[0] in (lams[0], lams[-1]),
                       "value": _val_key(points[ranked[0]], measure)[0],
                       "runner_up_value": _val_key(points[ranked[1]], measure)[0]}
    return {"chosen": by["token_accuracy"]["chosen"],          # the main measure's choice
            "runner_up": by["token_accuracy"]["runner_up"],
            "by_measure": by, "lambdas": lams,
            "grid": {str(lam): per_pair for lam, per_pair in sorted(points.items())}}


def _val_key(per_pair: list[dict], measure: str) -> tuple[float, float]:
    """Validation criterion: the mean of ``measure`` over pairs and tasks, then the other
    measure of :data:`MEASURES` (ties are frequent in exact match, which is often near 0)."""
    def mean(key: str) -> float:
        return sum(sum(t[key] for t in r.values()) / len(r) for r in per_pair) / len(per_pair)
    other = next(m for m in MEASURES if m != measure)
    return mean(measure), mean(other)


def hits_string(hits: torch.Tensor) -> str:
    """Per-prompt answer tokens right as one digit per prompt (compact JSON)."""
    return "".join(str(int(h)) for h in hits)


def evaluate(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads if get_device().type == "cpu"
                          else torch.get_num_threads())
    device = get_device()
    start = time.time()
    model, tokenizer = load_smollm2(device=device)
    model.eval()
    names = [f"{t}-s{s}" for s in (*SELECT_SEEDS, *REPORT_SEEDS) for t in TASKS]
    adapters = {n: read_adapter(args.adapters / n) for n in names}
    examples = heldout_examples(args.n_val, args.n_test)
    batches = {split: {t: encode_task(tokenizer, examples[t][split]).to(device) for t in TASKS}
               for split in ("validation", "test")}
    lengths = {t: int(b.input_ids.shape[1] - b.answer_start)
               for t, b in batches["test"].items()}
    assert set(lengths.values()) == {ANSWER_TOKENS}, lengths

    def test_items(adapter=None, scale=1.0) -> dict:
        return scored_items(model, batches["test"], adapter, scale)

    result = {**provenance("combine_tasks", device),  # git_commit with "+dirty" if dirty
              "settings": {"methods": args.methods, "control_methods": args.control_methods,
                           "designs": args.designs,
                           "lambda_grid": args.lambdas, "density": DENSITY,
                           "svd_rank": SVD_RANK, "weights": [1.0, 1.0],
                           "select_seeds": SELECT_SEEDS, "report_seeds": REPORT_SEEDS,
                           "pairs": {d: {"select": pairs(d, SELECT_SEEDS),
                                         "report": pairs(d, REPORT_SEEDS)} for d in DESIGNS},
                           "n_val": args.n_val, "n_test": args.n_test,
                           "val_seed": VAL_SEED, "test_seed": TEST_SEED,
                           "answer_tokens": ANSWER_TOKENS,
                           "criterion": "λ chosen separately on each measure: mean "
                                        "per-token accuracy (ties: mean greedy exact match) "
                                        "and mean greedy exact match (ties: mean per-token "
                                        "accuracy), over both tasks and the selection pairs; "
                                        "the grid is extended by a factor √2 while either "
                                        "measure's best λ is at its edge (bounds "
                                        f"{LAMBDA_BOUNDS[0]:g} to {LAMBDA_BOUNDS[1]:g})",
                           "test_lambdas": "test[design][type]['at'] holds the report pairs "
                                           "scored at every λ chosen or ranked second on "
                                           "either measure; 'lambda'/'pairs' are the "
                                           "token-accuracy choice",
                           "threads": torch.get_num_threads(),
                           "dare_generator": "torch.Generator().manual_seed(1000 + pair "
                                             "index), one draw per combination"},
              "examples": examples}
    print("base model and each report adapter alone, on test", flush=True)
    with cpu_lock(args.lock):
        result["base_test"] = test_items()
        result["alone_test"] = {n: test_items(adapters[n]) for n in names
                                if int(n.rsplit("-s", 1)[1]) in REPORT_SEEDS}
    result["selection"], result["test"] = {}, {}
    for design in args.designs:
        result["selection"][design], result["test"][design] = {}, {}
        for method in (args.control_methods if design == "shared" else args.methods):
            with cpu_lock(args.lock):
                chosen = choose_lambda(model, adapters, batches["validation"], design, method,
                                       args.lambdas)
                # every λ some measure chose or ranked second, scored on the report pairs
                scored = sorted({chosen["by_measure"][m][k] for m in MEASURES
                                 for k in ("chosen", "runner_up")})
                combos = [combination(adapters, pair, method, i)
                          for i, pair in enumerate(pairs(design, REPORT_SEEDS))]
                at = {str(lam): [{"pair": pair, **test_items(c, lam)}
                                 for pair, c in zip(pairs(design, REPORT_SEEDS), combos)]
                      for lam in scored}
            result["selection"][design][method] = chosen
            result["test"][design][method] = {"lambda": chosen["chosen"],
                                              "pairs": at[str(chosen["chosen"])], "at": at}
            report = at[str(chosen["chosen"])]
            em = {t: sum(r[t]["hits"].count(str(ANSWER_TOKENS)) for r in report)
                  / (len(report) * args.n_test) for t in TASKS}
            picks = ", ".join(f"{m} {chosen['by_measure'][m]['chosen']:g} (runner-up "
                              f"{chosen['by_measure'][m]['runner_up']:g})" for m in MEASURES)
            print(f"{design} {method}: λ by {picks}; grid {chosen['lambdas']}; test exact "
                  f"match at the token-chosen λ {em} ({time.time() - start:.0f} s)", flush=True)
    result["wall_seconds"] = round(time.time() - start)
    write_result(result, "combine_tasks-eval", device, out=args.result)
    return 0


def unscored_lambdas(evaluation: dict, design: str, method: str) -> list[float]:
    """The λ of a type's final validation grid at which ``evaluation`` has no test scores."""
    scored = set(evaluation["test"][design][method]["at"])
    return [lam for lam in evaluation["selection"][design][method]["lambdas"]
            if str(lam) not in scored]


def evaluate_grid(args: argparse.Namespace) -> int:
    """--evaluate-grid: test scores at the λ the committed evaluation left unscored."""
    device = get_device()
    source_path = RESULTS / f"combine_tasks-eval-{device.type}.json"
    evaluation = json.loads(source_path.read_text())
    if evaluation["git_commit"].endswith("+dirty"):
        raise SystemExit(f"{source_path} was made from a dirty tree")
    torch.set_num_threads(args.threads if device.type == "cpu" else torch.get_num_threads())
    start = time.time()
    model, tokenizer = load_smollm2(device=device)
    model.eval()
    cfg = evaluation["settings"]
    examples = heldout_examples(cfg["n_val"], cfg["n_test"])
    assert json.loads(json.dumps(examples)) == evaluation["examples"], "other prompts"
    batches = {t: encode_task(tokenizer, examples[t]["test"]).to(device) for t in TASKS}
    names = [f"{t}-s{s}" for s in REPORT_SEEDS for t in TASKS]
    adapters = {n: read_adapter(args.adapters / n) for n in names}
    result = {**provenance("combine_tasks-eval-grid", device),
              "source_git_commit": evaluation["git_commit"], "source_date": evaluation["date"],
              "settings": {"n_test": cfg["n_test"], "report_seeds": REPORT_SEEDS,
                           "threads": torch.get_num_threads(),
                           "reproduced": "reproduced[design][type]: the share of the first "
                                         "pair's per-prompt hits at the chosen λ, scored "
                                         "again, equal to the source's",
                           "what": "test[design][type]['at'][λ]: the report pairs scored at "
                                   "each λ of the final validation grid that the source "
                                   "evaluation did not score, as its own 'at' entries"},
              "test": {}}
    for design, methods in evaluation["test"].items():
        result["test"][design] = {}
        for method in methods:
            design_pairs = pairs(design, REPORT_SEEDS)
            assert [tuple(e["pair"]) for e in next(iter(
                evaluation["test"][design][method]["at"].values()))] == design_pairs
            combos = [combination(adapters, pair, method, i)
                      for i, pair in enumerate(design_pairs)]
            # the same computation? the first pair at the chosen λ again, against the source
            chosen = evaluation["test"][design][method]["lambda"]
            again = score(model, batches, combos[0], chosen)
            then = evaluation["test"][design][method]["at"][str(chosen)][0]
            result.setdefault("reproduced", {}).setdefault(design, {})[method] = float(np.mean(
                [a == b for t in TASKS
                 for a, b in zip(hits_string(again[t]["hits"]), then[t]["hits"])]))
            at = {}
            for lam in unscored_lambdas(evaluation, design, method):
                at[str(lam)] = [{"pair": pair, **scored_items(model, batches, c, lam)}
                                for pair, c in zip(design_pairs, combos)]
            result["test"][design][method] = {"at": at}
            print(f"{design} {method}: scored λ {sorted(float(k) for k in at)} "
                  f"({time.time() - start:.0f} s)", flush=True)
            write_result(result, "combine_tasks-eval-grid", device)   # after every type
    result["wall_seconds"] = round(time.time() - start)
    write_result(result, "combine_tasks-eval-grid", device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
