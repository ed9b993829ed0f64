"""The graded assignments (assignments/NN_*.md, built by scripts/assignments.py with otter).

Fast checks of the sources; `make grade-check` runs the autograders themselves (every
reference solution to full marks, every unchanged student notebook to zero).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import jupytext
import nbformat
import pytest

import lora_edu.checks as checks

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import assignments as asg  # noqa: E402
import notebook_tools as nt  # noqa: E402

SOURCES = asg.sources()
IDS = [s.stem for s in SOURCES]


def _flat(text: str) -> str:
    return " ".join(text.split())


def _exercises(chapter: Path) -> str:
    text = chapter.read_text(encoding="utf-8")
    assert "\n## Exercises\n" in text, f"{chapter.name} has no Exercises section"
    return text.split("\n## Exercises\n", 1)[1].split("\n## ", 1)[0]


def _questions(source: Path) -> list[dict]:
    """Each question's config, solution cells and test cells, from the raw-cell markers."""
    questions, current, mode = [], None, None
    for cell in jupytext.read(source, fmt="md:myst").cells:
        first = cell.source.strip().splitlines()[0] if cell.source.strip() else ""
        if cell.cell_type == "raw" and first == "# BEGIN QUESTION":
            current = {"config": cell.source, "solutions": [], "tests": []}
            questions.append(current)
        elif cell.cell_type == "raw" and first in ("# BEGIN SOLUTION", "# BEGIN TESTS"):
            mode = "solutions" if "SOLUTION" in first else "tests"
        elif cell.cell_type == "raw" and first.startswith("# END"):
            mode = None
        elif cell.cell_type == "code" and current is not None and mode:
            current[mode].append(cell.source)
    return questions


def test_every_chapter_has_an_assignment():
    missing = [c.stem for c in nt.chapters() if c.stem not in IDS]
    assert not missing, f"chapters without a graded assignment in assignments/: {missing}"
    extra = [s for s in IDS if not (ROOT / "book" / f"{s}.md").exists()]
    assert not extra, f"assignments without a chapter: {extra}"


@pytest.mark.parametrize("source", SOURCES, ids=IDS)
def test_the_exercises_it_grades_are_still_in_the_chapter(source: Path):
    meta = jupytext.read(source, fmt="md:myst").metadata["lora_edu_assignment"]
    chapter = ROOT / "book" / f"{meta['chapter']}.md"
    assert meta["chapter"] == source.stem and chapter.exists()
    section = _flat(_exercises(chapter))
    gone = [e for e in meta["exercises"] if _flat(e) not in section]
    assert not gone, (f"{source.name} grades exercises of {chapter.name} that its Exercises "
                      f"section no longer has: {gone}; update the assignment (and its phrase)")


@pytest.mark.parametrize("source", SOURCES, ids=IDS)
def test_every_question_has_points_a_solution_and_tests(source: Path):
    questions = _questions(source)
    assert questions, f"{source.name} has no graded question"
    for q in questions:
        points = re.search(r"^points:\s*([0-9.]+)", q["config"], re.M)
        assert points and float(points.group(1)) > 0, q["config"]
        assert any("# BEGIN SOLUTION" in s or "# SOLUTION" in s for s in q["solutions"]), q
        assert q["tests"], f"{source.name}: a question without tests: {q['config']}"


def test_every_checker_is_graded_in_its_chapters_assignment():
    """The checkers' table (lora_edu.checks' docstring) names each checker's chapter."""
    table = re.findall(r":func:`(check_\w+)`.*?(\d+)\s*$", checks.__doc__, re.M)
    assert {name for name, _ in table} == {n for n in checks.__all__ if n.startswith("check_")}
    by_number = {int(s.stem[:2]): s for s in SOURCES}
    unused = [(name, n) for name, n in table
              if name not in "\n".join(t for q in _questions(by_number[int(n)])
                                      for t in q["tests"])]
    assert not unused, f"checkers no test of their chapter's assignment calls: {unused}"


def test_the_master_has_otters_configuration_and_the_set_up_cell():
    nb = asg.master(SOURCES[0])
    assert nb.cells[0].cell_type == "raw"
    assert nb.cells[0].source.startswith("# ASSIGNMENT CONFIG")
    setup = next(c for c in nb.cells if c.cell_type == "code")
    assert asg.otter_pin() in setup.source and nt.install_line().split("--quiet ")[1] in \
        setup.source
    assert 'grader = otter.Notebook("01_rank.ipynb")' in setup.source


def _normalised(text: str) -> str:
    """Letters and digits only (ᵀ as T), so that a formula matches however it is spaced."""
    return "".join(ch for ch in text.replace("ᵀ", "T") if ch.isalnum())


def test_every_question_has_a_public_test():
    """A student can check each answer before submitting (hidden tests only add cases)."""
    bare = [(s.stem, q["config"].split("name:")[1].split()[0]) for s in SOURCES
            for q in _questions(s) if all("hidden: true" in t for t in q["tests"])]
    assert not bare, f"questions whose every test is hidden (no public test): {bare}"


@pytest.mark.parametrize("source", SOURCES, ids=IDS)
def test_otter_assign_strips_the_solutions(source: Path, tmp_path, monkeypatch):
    """A real build: the student notebook keeps the prompts, a check cell per question, and
    none of the solution code; no docstring left to the student states a solution's result."""
    pytest.importorskip("otter")
    monkeypatch.setattr(asg, "OUT", tmp_path)
    asg.build_one(source)
    student = nbformat.read(tmp_path / "student" / f"{source.stem}.ipynb", as_version=4)
    text = "\n".join(c.source for c in student.cells)
    solutions = [s.split("# BEGIN SOLUTION", 1)[-1].split("# END SOLUTION")[0]
                 for q in _questions(source) for s in q["solutions"]]
    solution_lines = [line.strip() for s in solutions for line in s.splitlines()
                      if line.strip() and not line.strip().startswith("#")]
    assert solution_lines
    leaked = [line for line in solution_lines
              if line in text and not line.startswith(('"""', "def ", "return out"))]
    assert not leaked, f"solution code in the student notebook: {leaked}"
    assert "BEGIN SOLUTION" not in text
    for q in _questions(source):
        name = q["config"].split("name:")[1].split()[0]
        assert f'grader.check("{name}")' in text, f"{source.name}: no check cell for {name}"
    # docstrings say what to compute, never the formula whose value the solution returns
    docstrings = [_normalised(d) for d in re.findall(r'"""(.*?)"""', text, re.S)]
    results = [_normalised(line.split("return", 1)[1]) for s in solutions
               for line in s.splitlines() if line.strip().startswith("return ")]
    given = [r for r in results if len(r) >= 4 and any(r in d for d in docstrings)]
    assert not given, f"{source.name}: a docstring states a solution's result: {given}"
    assert (tmp_path / "autograder" / f"{source.stem}-autograder.zip").exists()
