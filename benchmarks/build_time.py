"""How long the book takes to build: each page's execution time and the whole build's wall time.

Usage: python benchmarks/build_time.py [--keep-cache]

Builds the book exactly as ``make book`` does (clean execution cache; every page executed by
``scripts/execute_book.py``, two at a time with one thread each; then ``jupyter-book build``
with warnings as errors), times the whole build, reads each page's execution time from the
jupyter-cache records, prints a table and writes
``benchmarks/results/build_time-<device>.json``. The instructors' page shows that file. A
page's time is measured while another page runs beside it, as in the real build.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from jupyter_cache import get_cache

from lora_edu.report import show_table
from lora_edu.repro import get_device

from _provenance import provenance, write_result  # benchmarks/ is on sys.path

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "_build"
TARGET_SECONDS = 720  # the standard: the whole book from a clean cache in <= 12 minutes on 2 cores


def build(keep_cache: bool) -> float:
    if not keep_cache:  # as make book: the execution cache and Sphinx's parsed pages go
        shutil.rmtree(BUILD, ignore_errors=True)
    jb = Path(sys.executable).with_name("jupyter-book")
    env = {**os.environ, "LORA_EDU_PROGRESS": "static"}
    start = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "scripts" / "execute_book.py")], check=True,
                   env=env, cwd=ROOT)
    subprocess.run([str(jb), "build", str(ROOT), "--warningiserror", "--keep-going"],
                   check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def page_times() -> list[tuple[str, float]]:
    cache = get_cache(str(BUILD / ".jupyter_cache"))
    rows = [(Path(r.uri).relative_to(ROOT).as_posix(), float(r.data["execution_seconds"]))
            for r in cache.list_cache_records()]
    return sorted(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep-cache", action="store_true",
                        help="re-use the execution cache (times only what re-executes)")
    args = parser.parse_args()
    wall = build(args.keep_cache)
    pages = page_times()
    executed = sum(t for _, t in pages)
    device = get_device()
    show_table([(p, t) for p, t in pages] + [("all pages, executed", executed),
                                              ("whole build, wall time", wall)],
               ["page", "seconds"], title=f"Book build on {device.type}, "
                                          f"{os.cpu_count()} CPU cores", numeric_format="{:.1f}")
    result = {
        **provenance("build_time", device),
        "clean_cache": not args.keep_cache,
        "execution": "scripts/execute_book.py: 2 pages at a time, OMP_NUM_THREADS=1",
        "pages": {p: round(t, 2) for p, t in pages},
        "executed_seconds": round(executed, 2),
        "wall_seconds": round(wall, 1),
        "target_seconds": TARGET_SECONDS,
        "wall_over_target_ratio": round(wall / TARGET_SECONDS, 3),
    }
    write_result(result, "build_time", device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
