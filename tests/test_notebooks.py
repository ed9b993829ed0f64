"""The chapters, their Colab notebooks, badges, install cells and the table of contents agree.

The notebooks are for students: each is its chapter minus its solutions (no ``solution``-tagged
code cell, no ``{admonition} Solution`` block), and runs without them (no kept cell uses a name
that only a solution cell defines).
"""

from __future__ import annotations

import ast
import builtins
import re
import sys
from pathlib import Path

import jupytext
import nbformat
import pytest
from IPython.core.inputtransformer2 import TransformerManager

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import notebook_tools as nt  # noqa: E402

CHAPTERS = nt.chapters()
IDS = [c.stem for c in CHAPTERS]


def test_every_chapter_has_a_notebook_and_no_notebook_lacks_a_chapter():
    expected = {nt.notebook_path(c).name for c in CHAPTERS}
    present = {p.name for p in nt.NOTEBOOKS.glob("*.ipynb")}
    missing, extra = sorted(expected - present), sorted(present - expected)
    assert not missing, f"notebooks missing: {missing}; run `{nt.REGENERATE}`"
    assert not extra, f"notebooks without a chapter in book/: {extra}; run `{nt.REGENERATE}`"


@pytest.mark.parametrize("chapter", CHAPTERS, ids=IDS)
def test_notebook_is_in_sync_with_its_chapter(chapter: Path):
    notebook = nt.notebook_path(chapter)
    if not notebook.exists():
        pytest.fail(f"{notebook.relative_to(ROOT)} is missing; run `{nt.REGENERATE}`")
    if notebook.read_text(encoding="utf-8") != nt.render(nt.chapter_to_notebook(chapter)):
        pytest.fail(f"{notebook.relative_to(ROOT)} is stale against "
                    f"{chapter.relative_to(ROOT)}; run `{nt.REGENERATE}`")


def _cells(chapter: Path):
    return jupytext.read(chapter, fmt="md:myst").cells


@pytest.mark.parametrize("chapter", CHAPTERS, ids=IDS)
def test_first_markdown_cell_has_a_colab_badge_to_an_existing_notebook(chapter: Path):
    first = next(c for c in _cells(chapter) if c.cell_type == "markdown")
    links = re.findall(r"\]\((https://colab\.research\.google\.com/[^)]+)\)", first.source)
    assert links == [nt.colab_url(chapter)], (
        f"{chapter.name}: the first markdown cell needs exactly one badge linking "
        f"{nt.colab_url(chapter)}")
    assert f"![Open in Colab]({nt.BADGE_IMAGE})" in first.source
    assert (ROOT / "book" / nt.BADGE_IMAGE).exists()
    assert nt.notebook_path(chapter).exists()


@pytest.mark.parametrize("chapter", CHAPTERS, ids=IDS)
def test_first_code_cell_installs_only_in_colab_and_is_removed_from_the_page(chapter: Path):
    first = next(c for c in _cells(chapter) if c.cell_type == "code")
    assert "remove-cell" in first.metadata.get("tags", []), f"{chapter.name}: tag remove-cell"
    assert 'if "google.colab" in sys.modules:' in first.source
    assert nt.install_line() in first.source, f"{chapter.name}: expected `{nt.install_line()}`"


def test_toc_lists_only_existing_pages_and_every_chapter():
    files = nt.toc_files()
    missing = [f for f in files if not (ROOT / f"{f}.md").exists()]
    assert not missing, f"_toc.yml lists pages that do not exist: {missing}"
    absent = [c.stem for c in CHAPTERS if f"book/{c.stem}" not in files]
    assert not absent, f"chapters missing from _toc.yml: {absent}"
    assert len(files) == len(set(files)), "a page is listed twice in _toc.yml"


def test_notebook_generation_is_deterministic_and_strips_outputs():
    for chapter in CHAPTERS:
        nb = nt.chapter_to_notebook(chapter)
        assert nt.render(nb) == nt.render(nt.chapter_to_notebook(chapter))
        assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")
        assert len({c.id for c in nb.cells}) == len(nb.cells)


def test_an_edited_chapter_makes_its_notebook_stale(tmp_path):
    """The mechanism behind the sync test: a one-character edit changes the notebook."""
    chapter = tmp_path / "99_example.md"
    chapter.write_text("# Example\n\n```{code-cell} ipython3\nx = 1\n```\n")
    before = nt.render(nt.chapter_to_notebook(chapter))
    chapter.write_text("# Example\n\n```{code-cell} ipython3\nx = 2\n```\n")
    assert nt.render(nt.chapter_to_notebook(chapter)) != before


@pytest.mark.parametrize("chapter", CHAPTERS, ids=IDS)
def test_every_chapter_ends_with_exercises_with_solutions_and_references(chapter: Path):
    text = chapter.read_text(encoding="utf-8")
    assert "\n## Exercises\n" in text, f"{chapter.name}: no '## Exercises' section"
    section = text.split("\n## Exercises\n", 1)[1].split("\n## ", 1)[0]
    exercises = re.findall(r"^\d+\. ", section, re.M)
    solutions = re.findall(r":class: dropdown", section)
    assert len(exercises) >= 3, f"{chapter.name}: {len(exercises)} exercises, at least 3 needed"
    assert len(solutions) >= 3, f"{chapter.name}: solutions belong in dropdown admonitions"
    assert "```{bibliography}" in text, f"{chapter.name}: no references"


# --------------------------------------------------------------------------- no solutions

def _notebook(chapter: Path) -> nbformat.NotebookNode:
    path = nt.notebook_path(chapter)
    if not path.exists():
        pytest.fail(f"{path.relative_to(ROOT)} is missing; run `{nt.REGENERATE}`")
    return nbformat.read(path, as_version=4)


def _solution_count(chapter: Path) -> int:
    """Solutions in the chapter's source, counted from the text (not by the stripping code)."""
    text = chapter.read_text(encoding="utf-8")
    blocks = len(re.findall(r"^(?::{3,}|`{3,})\{admonition\}[ \t]+Solution\b", text, re.M))
    cells = sum(nt.is_solution_cell(c) for c in _cells(chapter))
    return blocks + cells


@pytest.mark.parametrize("chapter", CHAPTERS, ids=IDS)
def test_notebook_is_the_chapter_minus_its_solutions(chapter: Path):
    nb = _notebook(chapter)
    leaks = [i for i, c in enumerate(nb.cells) if nt.is_solution_cell(c)
             or (c.cell_type == "markdown" and re.search(r"\{admonition\}[ \t]+Solution\b",
                                                         c.source))]
    assert not leaks, (f"{chapter.name}: notebook cells {leaks} hold solutions; run "
                       f"`{nt.REGENERATE}`")
    # every cell that is not a solution is kept, in order (the badge URL aside)
    fresh = jupytext.read(chapter, fmt="md:myst")
    removed = nt.strip_solutions(fresh)
    assert removed == _solution_count(chapter), f"{chapter.name}: a solution was not removed"
    kept_code = [nt.pin_installs(c.source) for c in _cells(chapter)  # extras pinned for Colab
                 if c.cell_type == "code" and not nt.is_solution_cell(c)]
    assert [c.source for c in nb.cells if c.cell_type == "code"] == kept_code
    # and so is every exercise statement
    section = chapter.read_text(encoding="utf-8").split("\n## Exercises\n", 1)[1]
    statements = re.findall(r"^\d+\. .+$", section.split("\n## ", 1)[0], re.M)
    text = "\n".join(c.source for c in nb.cells)
    lost = [s for s in statements if s not in text]
    assert not lost, f"{chapter.name}: exercise statements missing from the notebook: {lost}"


def test_stripping_solution_blocks_follows_myst_fences():
    text = "\n".join([
        "1. An exercise.", "", ":::{admonition} Solution 1", ":class: dropdown", "Prose.",
        "```python", "x = 1", "```", ":::", "", "::::{admonition} Solution 2 (hard)",
        ":class: dropdown", ":::{note}", "inner", ":::", "still inside", "::::", "",
        "```{admonition} Solution 3", ":class: dropdown", "backtick fenced", "```", "",
        ":::{admonition} Hint", "kept", ":::", "", "After."])
    stripped, n = nt.strip_solution_blocks(text)
    assert n == 3
    assert stripped == "1. An exercise.\n\n:::{admonition} Hint\nkept\n:::\n\nAfter."


def _names(source: str) -> tuple[set[str], set[str]]:
    """(names a cell defines, names it reads), IPython magics translated first."""
    tree = ast.parse(TransformerManager().transform_cell(source))
    defined: set[str] = set()
    used: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (used if isinstance(node.ctx, ast.Load) else defined).add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, ast.arg):
            defined.add(node.arg)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            defined |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, ast.ExceptHandler) and node.name:
            defined.add(node.name)
    return defined, used


def solution_only_names(cells: list) -> list[tuple[int, str]]:
    """(cell index, name) for each name a kept code cell reads that, up to that cell, only
    solution cells define: a student notebook without the solution cells would fail there."""
    from_solutions: set[str] = set()
    kept: set[str] = set(dir(builtins)) | {"get_ipython", "display"}
    found = []
    for index, cell in enumerate(cells):
        if cell.cell_type != "code":
            continue
        defined, used = _names(cell.source)
        if nt.is_solution_cell(cell):
            from_solutions |= defined
            continue
        kept |= defined
        found += [(index, name) for name in sorted((used & from_solutions) - kept)]
    return found


@pytest.mark.parametrize("chapter", CHAPTERS, ids=IDS)
def test_notebook_runs_without_its_solution_cells(chapter: Path):
    found = solution_only_names(_cells(chapter))
    assert not found, (f"{chapter.name}: cells use names only a solution cell defines "
                       f"(cell index, name): {found}; define them in a cell that is not "
                       "tagged `solution`, or tag the using cell `solution` too")


def test_the_static_check_finds_a_name_only_a_solution_defines():
    cells = jupytext.reads("\n".join([
        "# T", "```{code-cell} ipython3", "%matplotlib inline", "import torch", "```",
        "```{code-cell} ipython3", ":tags: [hide-cell, solution]", "answer = torch.ones(2)",
        "```", "```{code-cell} ipython3", "print(answer, [i for i in range(2)])", "```"]),
        fmt="md:myst").cells
    assert solution_only_names(cells) == [(3, "answer")]


# ------------------------------------------------------------------ solutions that run

#: Chapters whose solutions are still prose only: Part IV waits for its new sweep (issue 21).
PROSE_SOLUTIONS = {"05_intrinsic_rank", "08_training_run", "09_what_lora_learns"}


def _asserts_something(source: str) -> bool:
    """An ``assert``, or a call of a ``check_*`` grader (they raise on a wrong answer)."""
    tree = ast.parse(TransformerManager().transform_cell(source))
    for node in ast.walk(tree):
        if isinstance(node, ast.Assert):
            return True
        if isinstance(node, ast.Call):
            name = getattr(node.func, "id", getattr(node.func, "attr", ""))
            if name.startswith("check_"):
                return True
    return False


@pytest.mark.parametrize("chapter", CHAPTERS, ids=IDS)
def test_every_solution_cell_asserts_its_answer(chapter: Path):
    """A solution's code runs in the build and asserts what its prose claims (issue 22)."""
    cells = [c for c in _cells(chapter) if c.cell_type == "code" and nt.is_solution_cell(c)]
    silent = [c.source.splitlines()[0] if c.source else "" for c in cells
              if not _asserts_something(c.source)]
    assert not silent, f"{chapter.name}: solution cells without an assert: {silent}"
    has_solutions = re.search(r"\{admonition\}[ \t]+Solution\b",
                              chapter.read_text(encoding="utf-8"))
    if has_solutions and chapter.stem not in PROSE_SOLUTIONS and chapter.stem.startswith(
            tuple("0123456789")):
        assert cells, (f"{chapter.name}: its solutions have no [hide-cell, solution] code cell "
                       "that computes and asserts their answers")
