"""Shared helpers: which pages are chapters, and how a chapter becomes its Colab notebook.

A chapter is ``book/NN_<topic>.md`` (two digits, an underscore, a lower-case topic). Its
notebook ``notebooks/NN_<topic>.ipynb`` is a pure function of the chapter's text, so that
``tests/test_notebooks.py`` can regenerate it in memory and compare: a stale notebook is one
that differs from what :func:`chapter_to_notebook` makes now.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import jupytext
import nbformat
import yaml

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT / "book"
NOTEBOOKS = ROOT / "notebooks"
CHAPTER_RE = re.compile(r"^\d\d_[a-z0-9_]+\.md$")
REGENERATE = "make notebooks"  # the command named in every staleness message

BADGE_IMAGE = "images/colab-badge.svg"


def chapters() -> list[Path]:
    """Every chapter source in ``book/``, in order."""
    return sorted(p for p in BOOK.iterdir() if CHAPTER_RE.match(p.name))


def toc_files() -> list[str]:
    """Every page ``_toc.yml`` names (root first), as written there: ``book/01_rank`` etc."""
    def walk(node: object) -> list[str]:
        if isinstance(node, dict):
            found = [node[k] for k in ("root", "file") if k in node]
            return found + [f for v in node.values() for f in walk(v)]
        if isinstance(node, list):
            return [f for item in node for f in walk(item)]
        return []
    return walk(yaml.safe_load((ROOT / "_toc.yml").read_text()))


def repository() -> tuple[str, str]:
    """``(owner/repo, branch)`` from the single repository URL in ``_config.yml``."""
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    url = config["repository"]["url"].rstrip("/")
    match = re.fullmatch(r"https://github\.com/([^/]+/[^/]+?)(?:\.git)?", url)
    if match is None:
        raise ValueError(f"_config.yml repository.url must be https://github.com/<owner>/<repo>, "
                         f"got {url!r}")
    return match.group(1), config["repository"].get("branch", "main")


def colab_url(chapter: Path) -> str:
    slug, branch = repository()
    return (f"https://colab.research.google.com/github/{slug}/blob/{branch}/notebooks/"
            f"{chapter.stem}.ipynb")


def install_line() -> str:
    slug, branch = repository()
    return f'%pip install --quiet "lora-edu @ git+https://github.com/{slug}@{branch}"'


def notebook_path(chapter: Path) -> Path:
    return NOTEBOOKS / f"{chapter.stem}.ipynb"


def chapter_to_notebook(chapter: Path) -> nbformat.NotebookNode:
    """The Colab notebook for ``chapter``: no outputs, stable cell ids.

    Cell ids are derived from the chapter's name and the cell's position, so regenerating an
    unchanged chapter gives a byte-identical file. The badge image, a relative path on the
    website, becomes an absolute URL because Colab has no copy of the book's images.
    """
    nb = jupytext.reads(chapter.read_text(encoding="utf-8"), fmt="md:myst")
    slug, branch = repository()
    raw_badge = f"https://raw.githubusercontent.com/{slug}/{branch}/book/{BADGE_IMAGE}"
    for index, cell in enumerate(nb.cells):
        cell.id = hashlib.sha1(f"{chapter.stem}:{index}".encode()).hexdigest()[:12]
        if cell.cell_type == "markdown":
            cell.source = cell.source.replace(f"]({BADGE_IMAGE})", f"]({raw_badge})")
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
    nb.metadata.pop("jupytext", None)
    nb.metadata["colab"] = {"provenance": [], "toc_visible": True}
    nb.metadata["accelerator"] = "GPU"  # Colab offers a GPU runtime; chapters use it if present
    nb.metadata.setdefault("language_info", {"name": "python"})
    nb.nbformat, nb.nbformat_minor = 4, 5
    return nb


def render(nb: nbformat.NotebookNode) -> str:
    return nbformat.writes(nb, version=4) + "\n"
