"""Execute chapters in a fresh kernel and report each cell's time and any error.

Usage: python scripts/run_chapter.py book/01_rank.md [book/02_svd.md ...] [--json out.json]

Runs with LORA_EDU_PROGRESS=static, as the book build does. The executed notebook is written
next to the temporary directory it names, so its outputs can be inspected. Exit status 1 if
any cell raised (cells tagged raises-exception are allowed to).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import jupytext
import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = Path(__file__).resolve().parents[1]


def run(path: Path, out_dir: Path) -> dict:
    nb = jupytext.read(path, fmt="md:myst")
    os.environ["LORA_EDU_PROGRESS"] = "static"
    client = NotebookClient(nb, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    cell_times: list[tuple[int, float, str]] = []
    start = time.perf_counter()
    error = None
    with client.setup_kernel():
        for index, cell in enumerate(nb.cells):
            if cell.cell_type != "code":
                continue
            t0 = time.perf_counter()
            try:
                client.execute_cell(cell, index)
            except CellExecutionError as exc:
                error = f"cell {index}: {str(exc)[-2000:]}"
                break
            finally:
                first = cell.source.strip().splitlines()[0] if cell.source.strip() else ""
                cell_times.append((index, time.perf_counter() - t0, first[:70]))
    total = time.perf_counter() - start
    executed = out_dir / f"{path.stem}.ipynb"
    nbformat.write(nb, executed)
    return {"chapter": str(path.relative_to(ROOT)), "seconds": round(total, 2),
            "cells": cell_times, "error": error, "executed": str(executed)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("chapters", nargs="+", type=Path)
    parser.add_argument("--json", type=Path, help="also write the timings here")
    parser.add_argument("--quiet", action="store_true", help="totals only")
    args = parser.parse_args()
    out_dir = Path(tempfile.mkdtemp(prefix="lora-edu-run-"))
    results = []
    for chapter in args.chapters:
        result = run(chapter.resolve(), out_dir)
        results.append(result)
        if not args.quiet:
            for index, seconds, first in sorted(result["cells"], key=lambda c: -c[1])[:8]:
                print(f"  cell {index:3d} {seconds:7.2f} s  {first}")
        status = "FAILED" if result["error"] else "ok"
        print(f"{result['chapter']}: {status} in {result['seconds']:.1f} s "
              f"(executed notebook: {result['executed']})")
        if result["error"]:
            print(result["error"], file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 1 if any(r["error"] for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
