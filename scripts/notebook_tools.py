"""Shared helpers: which pages are chapters, and how a chapter becomes its Colab notebook.

A chapter is ``book/NN_<topic>.md`` (two digits, an underscore, a lower-case topic). Its
notebook ``notebooks/NN_<topic>.ipynb`` is a pure function of the chapter's text, so that
``tests/test_notebooks.py`` can regenerate it in memory and compare: a stale notebook is one
that differs from what :func:`chapter_to_notebook` makes now.

The notebooks are for students, so they carry **no solutions**. The book's convention (see
``../shared/DESIGN.md``): solution prose sits in ``:::{admonition} Solution N`` blocks with
``:class: dropdown`` (collapsed on the website), and a solution's code cell carries the tag
``solution`` (with ``hide-cell``). :func:`strip_solutions` removes both; the website keeps them.
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
SOLUTION_TAG = "solution"
# The opening line of a solution admonition, colon- or backtick-fenced (MyST accepts both):
# ":::{admonition} Solution 3", "::::{admonition} Solution", "```{admonition} Solution 2 (b)".
SOLUTION_OPEN = re.compile(r"^(?P<fence>:{3,}|`{3,})\{admonition\}[ \t]+Solution\b.*$")


def is_solution_cell(cell: dict) -> bool:
    """A code cell tagged ``solution`` (the website hides it; student notebooks drop it)."""
    return cell.get("cell_type") == "code" and SOLUTION_TAG in cell.get("metadata", {}).get(
        "tags", [])


def strip_solution_blocks(markdown: str) -> tuple[str, int]:
    """``markdown`` without its ``{admonition} Solution`` blocks, and how many were removed.

    A block ends at the first line made of the opening fence's character only, at least as
    long as the opening fence (MyST's rule, so nested directives with shorter fences stay
    inside). An unclosed block runs to the end of the cell, as MyST reads it.
    """
    lines = markdown.split("\n")
    kept: list[str] = []
    removed, i = 0, 0
    while i < len(lines):
        match = SOLUTION_OPEN.match(lines[i])
        if match is None:
            kept.append(lines[i])
            i += 1
            continue
        fence = match.group("fence")
        close = re.compile(rf"^{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$")
        i += 1
        while i < len(lines) and not close.match(lines[i]):
            i += 1
        i += 1  # past the closing fence
        removed += 1
        while kept and not kept[-1].strip() and i < len(lines) and not lines[i].strip():
            i += 1  # one blank line where the block was, not two
    return "\n".join(kept).strip("\n"), removed


def strip_solutions(nb: nbformat.NotebookNode) -> int:
    """Remove solution code cells and solution admonitions from ``nb`` in place.

    Markdown cells left empty are dropped. Returns how many solutions (cells and blocks)
    were removed.
    """
    cells, removed = [], 0
    for cell in nb.cells:
        if is_solution_cell(cell):
            removed += 1
            continue
        if cell.cell_type == "markdown":
            text, n = strip_solution_blocks(cell.source)
            removed += n
            if n and not text.strip():
                continue
            if n:
                cell.source = text
        cells.append(cell)
    nb.cells = cells
    return removed


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


def install_line(ref: str | None = None) -> str:
    """The notebooks' ``%pip`` line for lora-edu: the book's branch, or ``ref`` (a tag such as
    ``v0.2.0`` or a commit) where a course pins the package (``make assignments TAG=...``)."""
    slug, branch = repository()
    return f'%pip install --quiet "lora-edu @ git+https://github.com/{slug}@{ref or branch}"'


def pinned_versions() -> dict[str, str]:
    """``{package: version}`` of every exact pin (``name==X``) in requirements.txt."""
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)==(\S+)", line.split("#")[0].strip())
        if match:
            pins[match.group(1).lower()] = match.group(2)
    return pins


# A chapter's bare extra install, e.g. "%pip install --quiet peft" (no version given).
BARE_PIP = re.compile(r"^(?P<lead>\s*%pip install --quiet )(?P<names>[A-Za-z0-9_.\- ]+?)\s*$",
                      re.MULTILINE)


def pin_installs(source: str) -> str:
    """``source`` with every bare ``%pip install --quiet name ...`` pinned to requirements.txt's
    version (``peft`` becomes ``peft==0.21.2``), so that a Colab notebook installs the versions
    whose behaviour the chapter asserts. Names without a pin are left as they are."""
    pins = pinned_versions()

    def pin(match: re.Match) -> str:
        names = [f"{n}=={pins[n.lower()]}" if n.lower() in pins else n
                 for n in match.group("names").split()]
        return match.group("lead") + " ".join(names)
    return BARE_PIP.sub(pin, source)


def notebook_path(chapter: Path) -> Path:
    return NOTEBOOKS / f"{chapter.stem}.ipynb"


def chapter_to_notebook(chapter: Path) -> nbformat.NotebookNode:
    """The Colab notebook for ``chapter``: no solutions, no outputs, stable cell ids.

    Cell ids are derived from the chapter's name and the cell's position, so regenerating an
    unchanged chapter gives a byte-identical file. The badge image, a relative path on the
    website, becomes an absolute URL because Colab has no copy of the book's images.
    """
    nb = jupytext.reads(chapter.read_text(encoding="utf-8"), fmt="md:myst")
    strip_solutions(nb)
    slug, branch = repository()
    raw_badge = f"https://raw.githubusercontent.com/{slug}/{branch}/book/{BADGE_IMAGE}"
    for index, cell in enumerate(nb.cells):
        cell.id = hashlib.sha1(f"{chapter.stem}:{index}".encode()).hexdigest()[:12]
        if cell.cell_type == "markdown":
            cell.source = cell.source.replace(f"]({BADGE_IMAGE})", f"]({raw_badge})")
        if cell.cell_type == "code":
            cell.source = pin_installs(cell.source)
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
