"""Reproduce the pretrained checkpoint that ships in ``src/lora_edu/assets``.

    .venv/bin/python scripts/pretrain_checkpoint.py            # writes assets/gpt-cpu.*
    .venv/bin/python scripts/pretrain_checkpoint.py --check    # retrains, compares, writes nothing

The run is deterministic: ``seed_all`` fixes the initialisation and the batch order, and the
thread count is pinned because a CPU matmul's summation order depends on it. The same weights
(byte for byte, see ``weights_sha256`` in the JSON) come back on the same CPU type with the
same torch version, thread count and Python (whose standard library is the corpus; its
``corpus_sha256`` is recorded too). The JSON's ``history.wall_time_s`` says how long the
packaged run took (on a busy shared machine; an idle one is several times faster).
"""

from __future__ import annotations

import argparse
import hashlib
import platform
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from lora_edu.data import load_corpus
from lora_edu.models import save_checkpoint
from lora_edu.train import PRETRAIN_RECIPES, pretrain

ASSETS = Path(__file__).resolve().parents[1] / "src" / "lora_edu" / "assets"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--preset", default="cpu", choices=sorted(PRETRAIN_RECIPES))
    parser.add_argument("--out", type=Path, default=None,
                        help="checkpoint path without suffix (default: assets/gpt-<preset>)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (pinned)")
    parser.add_argument("--steps", type=int, default=None, help="override the recipe's steps")
    parser.add_argument("--check", action="store_true",
                        help="retrain into a temporary file and compare with the existing one")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    recipe = PRETRAIN_RECIPES[args.preset]
    if args.steps is not None:
        recipe = replace(recipe, steps=args.steps, eval_every=min(recipe.eval_every, args.steps),
                         warmup_steps=min(recipe.warmup_steps, args.steps // 10))
    out = args.out or ASSETS / f"gpt-{args.preset}"
    # --check writes into a temporary directory: the committed files are only read.
    target = Path(tempfile.mkdtemp()) / out.name if args.check else out

    start = time.perf_counter()
    model, hist = pretrain(args.preset, "cpu", recipe)
    source, docs = load_corpus("python-stdlib"), load_corpus("python-docs")
    metadata = {
        "description": f"GPT '{args.preset}' preset pretrained on Python's standard library "
                       f"source (byte-level)",
        "command": " ".join(["python", "scripts/pretrain_checkpoint.py", *sys.argv[1:]]),
        "recipe": asdict(recipe),
        "torch": torch.__version__, "python": platform.python_version(),
        "threads": args.threads,
        "corpus_sha256": {"python-stdlib": source.sha256, "python-docs": docs.sha256},
        "history": {
            "train_steps": hist.train_steps,
            "train_loss": [round(v, 4) for v in hist.train_loss],
            "eval_steps": hist.eval_steps,
            "eval_loss": {k: [round(v, 4) for v in vs] for k, vs in hist.eval_loss.items()},
            "step_time_s": round(hist.step_time_s, 4),
            "wall_time_s": round(time.perf_counter() - start, 1),
        },
    }
    json_path = save_checkpoint(model, target, metadata)
    weights = target.with_suffix(".safetensors")
    digest = sha256(weights)
    # The digest goes into the JSON after the weights exist, so it names exactly that file.
    save_checkpoint(model, target, {**metadata, "weights_sha256": digest})
    print(f"wrote {json_path} and {weights} ({weights.stat().st_size / 1e6:.2f} MB), "
          f"sha256 {digest[:16]}; final losses: "
          + ", ".join(f"{k}={v[-1]:.4f}" for k, v in hist.eval_loss.items()))
    if args.check:
        expected = sha256(out.with_suffix(".safetensors"))
        same = digest == expected
        print("identical to the committed checkpoint" if same else
              f"DIFFERS from the committed checkpoint ({expected[:16]})")
        for p in (weights, json_path):
            p.unlink()
        return 0 if same else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
