"""Execute every page of the book into the execution cache, two pages at a time.

Usage: python scripts/execute_book.py [--workers N] [--only PAGE ...]

``jupyter-book build`` executes pages one after another. This script stages the same pages
into the same jupyter-cache that MyST-NB reads (with MyST-NB's own reader, so that the cache
keys match), executes them in parallel worker processes, each kernel limited to one thread
(``OMP_NUM_THREADS=1``: two kernels with two threads each on two cores run many times slower
than one thread each), longest page first. The build that follows finds every page cached and
only renders. A page that fails is reported with its traceback and the exit status is 1.

The pages in ``LAST`` (the instructors' page) read the other pages' execution times from this
cache, so they execute after every other page has executed and been cached, and again whenever
another page executed in this run (their code is unchanged, so the cache alone would keep
their old times). Their own code is what the cache key hashes, so the ``jupyter-book build``
that follows finds them cached too and does not execute them again. The kernels see the
cache's path in ``LORA_EDU_EXECUTION_CACHE``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from multiprocessing import Pool
from pathlib import Path

import yaml
from jupyter_cache import get_cache
from jupyter_cache.executors.basic import ExecutionWorkerLocalMProc, ProcessData

sys.path.insert(0, str(Path(__file__).resolve().parent))
from notebook_tools import ROOT, toc_files

CACHE = ROOT / "_build" / ".jupyter_cache"
READER = {"name": "myst_nb_md", "type": "plugin"}  # what MyST-NB uses for .md notebooks
TIMINGS = ROOT / "benchmarks" / "results" / "build_time-cpu.json"
# pages that read the other pages' cache records: executed last, one at a time
LAST = [ROOT / "book" / "instructors.md"]


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


def execution_order(pages: list[Path]) -> tuple[list[Path], list[Path]]:
    """(the pages to run in parallel, longest first; the pages in LAST, in LAST's order)."""
    first = longest_first([p for p in pages if p not in LAST])
    return first, [p for p in LAST if p in pages]


def run(cache, records, workers: int, timeout: int) -> list[tuple[int, str]]:
    """Execute the records' notebooks, `workers` at a time; [(status, uri)], 0 = success."""
    if not records:
        return []
    jobs = [ProcessData(r.pk, r.uri, cache, timeout, False) for r in records]
    # One page per task (chunksize 1) so that no page waits behind the slowest one; the worker
    # is jupyter-cache's own: it executes in the page's folder and caches the result.
    with Pool(max(1, min(workers, len(jobs)))) as pool:
        return list(pool.imap_unordered(ExecutionWorkerLocalMProc(), jobs, chunksize=1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--timeout", type=int, default=900, help="seconds per cell")
    parser.add_argument("--only", nargs="+", metavar="PAGE",
                        help="execute only these pages (paths from the repository root)")
    parser.add_argument("--cache", type=Path, default=CACHE,
                        help=f"the jupyter-cache folder (default {CACHE.relative_to(ROOT)}; "
                             "jupyter-book build reads that one)")
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by every kernel
    os.environ.setdefault("LORA_EDU_PROGRESS", "static")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    pages = toc_pages()
    if args.only:
        wanted = {(ROOT / p).resolve() for p in args.only}
        unknown = wanted - set(pages)
        if unknown:
            parser.error(f"not notebook pages of _toc.yml: {sorted(map(str, unknown))}")
        pages = [p for p in pages if p in wanted]
    cache = get_cache(str(args.cache))
    os.environ["LORA_EDU_EXECUTION_CACHE"] = str(args.cache.resolve())  # read by LAST pages
    first, last = execution_order(pages)
    records = [cache.add_nb_to_project(str(p), read_data=READER) for p in first]
    # A page whose code is unchanged since it was last cached needs no execution.
    records = [r for r in records if cache.get_cached_project_nb(r.pk) is None]
    start = time.perf_counter()
    outcomes = run(cache, records, args.workers, args.timeout)
    others_ran = bool(outcomes)
    # The last pages show the others' times: re-run them when any other page executed now.
    for page in last:
        record = cache.add_nb_to_project(str(page), read_data=READER)
        cached = cache.get_cached_project_nb(record.pk)
        if cached is not None and others_ran:
            cache.remove_cache(cached.pk)
            os.utime(page)  # so that Sphinx reads the page again in an incremental build
            cached = None
        if cached is None:
            outcomes += run(cache, [record], 1, args.timeout)
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
