"""The chapters, their Colab notebooks, badges, install cells and the table of contents agree."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import jupytext
import pytest

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
