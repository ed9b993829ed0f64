"""Execute every page of the book into the execution cache, two pages at a time.

Usage: python scripts/execute_book.py [--workers N]

``jupyter-book build`` executes pages one after another. This script stages the same pages
into the same jupyter-cache that MyST-NB reads (with MyST-NB's own reader, so that the cache
keys match), executes them in parallel worker processes, each kernel limited to one thread
(``OMP_NUM_THREADS=1``: two kernels with two threads each on two cores run many times slower
than one thread each), longest page first. The build that follows finds every page cached and
only renders. A page that fails is reported with its traceback and the exit status is 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import yaml
from multiprocessing import Pool

from jupyter_cache import get_cache
from jupyter_cache.executors.basic import ExecutionWorkerLocalMProc, ProcessData

sys.path.insert(0, str(Path(__file__).resolve().parent))
from notebook_tools import ROOT, toc_files  # noqa: E402

CACHE = ROOT / "_build" / ".jupyter_cache"
READER = {"name": "myst_nb_md", "type": "plugin"}  # what MyST-NB uses for .md notebooks
TIMINGS = ROOT / "benchmarks" / "results" / "build_time-cpu.json"


def toc_pages() -> list[Path]:
    """The pages in _toc.yml that are notebooks (a jupytext header with a kernelspec)."""
    pages = [ROOT / f"{f}.md" for f in toc_files()]
    return [p for p in pages if _front_matter(p).get("kernelspec")]


def _front_matter(page: Path) -> dict:
    text = page.read_text(encoding="utf-8")
    if not text.startswith("---"):
        return {}
    return yaml.safe_load(text.split("---", 2)[1]) or {}


def longest_first(pages: list[Path]) -> list[Path]:
    """Order by the last measured execution time, so the slowest page starts at once."""
    try:
        measured = json.loads(TIMINGS.read_text())["pages"]
    except (OSError, KeyError, ValueError):
        measured = {}
    return sorted(pages, key=lambda p: -measured.get(p.relative_to(ROOT).as_posix(), 0.0))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--timeout", type=int, default=900, help="seconds per cell")
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by every kernel
    os.environ.setdefault("LORA_EDU_PROGRESS", "static")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    cache = get_cache(str(CACHE))
    records = [cache.add_nb_to_project(str(p), read_data=READER)
               for p in longest_first(toc_pages())]
    # A page whose code is unchanged since it was last cached needs no execution.
    records = [r for r in records if cache.get_cached_project_nb(r.pk) is None]
    jobs = [ProcessData(r.pk, r.uri, cache, args.timeout, False) for r in records]
    start = time.perf_counter()
    # One page per task (chunksize 1) so that no page waits behind the slowest one; the worker
    # is jupyter-cache's own: it executes in the page's folder and caches the result.
    with Pool(args.workers) as pool:
        outcomes = list(pool.imap_unordered(ExecutionWorkerLocalMProc(), jobs, chunksize=1))
    elapsed = time.perf_counter() - start

    failed = [uri for status, uri in outcomes if status != 0]
    for uri in failed:
        record = cache.get_project_record(uri)
        print(f"FAILED {Path(uri).relative_to(ROOT)}\n{record.traceback}", file=sys.stderr)
    print(f"executed {len(outcomes) - len(failed)} of {len(outcomes)} pages in {elapsed:.1f} s "
          f"with {args.workers} workers")
    return 1 if failed else 0

if __name__ == "__main__":
    raise SystemExit(main())
