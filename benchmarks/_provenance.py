"""Where and how a benchmark was measured, and where its figures are written.

Every script in ``benchmarks/`` writes ``benchmarks/results/<benchmark>-<device>.json``
beginning with :func:`provenance`: the device (and GPU name), the machine, the library
versions, the UTC date and the exact command, so that a committed figure says where it came
from.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def provenance(benchmark: str, device: torch.device) -> dict[str, Any]:
    """The fields every result file starts with."""
    return {
        "benchmark": benchmark,
        "device": device.type,
        "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + " ".join(sys.argv),
        "git_commit": _git_commit(),
    }


def _git_commit() -> str | None:
    """The commit the measured code was at (with ``+dirty`` if the tree had changes)."""
    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, check=True).stdout.strip()
        # benchmarks/results/ is what the benchmarks write, not code they run: a result file
        # changed by an earlier benchmark of the same session does not make this run dirty
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                ".", ":(exclude)benchmarks/results"],
                               cwd=root, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return sha + ("+dirty" if dirty else "")


def write_result(result: dict[str, Any], name: str, device: torch.device,
                 out: Path | None = None) -> Path:
    """Write ``result`` as JSON to ``out`` or ``results/<name>-<device>.json``; say where."""
    path = out or RESULTS / f"{name}-{device.type}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return path


def resumed_runs(out_file: Path, result: dict[str, Any], key) -> dict:
    """For ``--resume``: the runs of an earlier, cut-short result file, by ``key(run)``.

    Only a file written by this same clean commit counts (its runs were made by this code), and
    ``result`` records where it resumed from. An absent file resumes nothing.

    Raises:
        SystemExit: the file is from another commit, or this tree is dirty.
    """
    if not out_file.exists():
        return {}
    previous = json.loads(out_file.read_text())
    commit = result["git_commit"] or ""
    if previous.get("git_commit") != commit or "+dirty" in commit:
        raise SystemExit(f"--resume needs a result of this same clean commit; {out_file} is "
                         f"from {previous.get('git_commit')}, this tree is {commit}")
    result["resumed_from"] = previous["date"]
    done = {key(r): r for r in previous["runs"]}
    print(f"resuming: {len(done)} runs already done", flush=True)
    return done
