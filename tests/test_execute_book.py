"""scripts/execute_book.py: the instructors' page runs last and its cache entry survives."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import nbformat
from jupyter_cache import get_cache
from jupyter_cache.base import CacheBundleIn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import execute_book


def test_pages_that_read_the_cache_run_after_every_other_page():
    pages = execute_book.toc_pages()
    first, last = execute_book.execution_order(pages)
    instructors = ROOT / "book" / "instructors.md"
    assert instructors in pages, "the instructors' page is a notebook page of _toc.yml"
    assert last == [instructors]
    assert instructors not in first
    assert sorted(first + last) == sorted(pages), "every page runs exactly once"


def test_a_cached_page_stays_cached_when_only_its_time_stamp_changes(tmp_path):
    """execute_book touches the re-executed last page (so that Sphinx reads it again); the
    cache key is the page's code, so the build that follows still finds it cached and does
    not execute it a second time."""
    page = tmp_path / "page.ipynb"
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1")])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    nbformat.write(nb, page)
    cache = get_cache(str(tmp_path / "cache"))
    record = cache.add_nb_to_project(str(page))
    cache.cache_notebook_bundle(CacheBundleIn(nb, str(page), data={"execution_seconds": 1.5}),
                                check_validity=False, overwrite=True)
    os.utime(page, (0, 0))
    os.utime(page)
    cached = cache.get_cached_project_nb(record.pk)
    assert cached is not None and cached.data["execution_seconds"] == 1.5
    assert cache.match_cache_notebook(nbformat.read(page, as_version=4)).pk == cached.pk


def test_only_refuses_a_page_that_is_not_a_notebook_of_the_book(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["execute_book.py", "--only", "README.md"])
    try:
        execute_book.main()
    except SystemExit as exc:
        assert exc.code == 2
    else:
        raise AssertionError("--only README.md should be refused")
    assert "not notebook pages" in capsys.readouterr().err
