"""The graded assignments (assignments/NN_*.md, built by scripts/assignments.py with otter).

Fast checks of the sources; `make grade-check` runs the autograders themselves (every
reference solution to full marks, every unchanged student notebook and every wrong one to zero).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import jupytext
import nbformat
import pytest
import torch
import yaml

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


GREEK = {"α": "alpha", "β": "beta", "γ": "gamma", "δ": "delta", "ε": "eps", "η": "eta",
         "θ": "theta", "λ": "lambda", "μ": "mu", "π": "pi", "σ": "sigma", "Σ": "S",
         "φ": "phi", "ω": "omega"}
# LaTeX that code does not spell: fraction and spacing commands, \top as T, operator names
LATEX = re.compile(r"\\(?:[dt]?frac|cdot|left|right|operatorname|mathrm|text|[,;!]|quad)")


def _normalised(text: str) -> str:
    """Letters and digits only, so that a formula matches however it is written: in code
    (``alpha / r * B @ A``), in Unicode (``(α/r) B A``, ``W − …``, ``ᵀ``) or in LaTeX
    (``\\tfrac{\\alpha}{r}BA``, ``A^\\top``)."""
    text = LATEX.sub("", text.replace("\\top", "T").replace("ᵀ", "T").replace(".T", "T"))
    text = "".join(GREEK.get(ch, ch) for ch in text).replace("\\", "")
    return "".join(ch for ch in text if ch.isascii() and ch.isalnum())


def test_normalised_formulas_match_however_written():
    code = _normalised("W0 + (alpha / r) * B @ A")
    for written in ("W0 + (α/r) B A.", r"$W_0 + \tfrac{\alpha}{r}BA$", "W0 + (α / r)·B A"):
        assert code in _normalised(written), written
    assert _normalised("W − s·B A") == _normalised("W - s * B @ A")
    assert _normalised("x @ A.T") == _normalised(r"x A^\top") == _normalised("x Aᵀ")


def _tests(source: Path) -> list[tuple[str, str, dict]]:
    """(question, test code, test config) of every test cell."""
    found = []
    for q in _questions(source):
        name = q["config"].split("name:")[1].split()[0]
        for test in q["tests"]:
            config = {}
            if test.lstrip().startswith('""" # BEGIN TEST CONFIG'):
                block = test.split('""" # BEGIN TEST CONFIG', 1)[1].split('""" # END TEST CONFIG')[0]
                config = yaml.safe_load(block) or {}
            found.append((name, test, config))
    return found


@pytest.mark.parametrize("source", SOURCES, ids=IDS)
def test_points_sit_on_hidden_tests_only(source: Path):
    """A public test checks type or shape and earns nothing (``points: 0``); every question
    has a hidden test, so its points are there (otter splits them over the tests without a
    ``points`` of their own)."""
    tests = _tests(source)
    paying = [(name, test.strip().splitlines()[-1]) for name, test, config in tests
              if not config.get("hidden") and config.get("points") != 0]
    assert not paying, f"{source.name}: public tests that carry points: {paying}"
    unpaid = {name for name, _, _ in tests} - {name for name, _, config in tests
                                                if config.get("hidden")}
    assert not unpaid, f"{source.name}: questions without a hidden test: {sorted(unpaid)}"


@pytest.mark.parametrize("source", SOURCES, ids=IDS)
def test_every_question_has_a_wrong_answer(source: Path):
    """make grade-check grades a wrong notebook (these answers) and expects zero."""
    names = [q["config"].split("name:")[1].split()[0] for q in _questions(source)]
    wrong = asg.wrong_answers(source)
    assert sorted(wrong) == sorted(names), f"{source.name}: lora_edu_wrong must give one " \
        f"wrong answer per question {names}, has {sorted(wrong)}"
    for name, code in wrong.items():
        compile(code, f"{source.name}:{name}", "exec")


@pytest.mark.parametrize("source", SOURCES, ids=IDS)
def test_reference_functions_are_not_imported_into_the_student_notebook(source: Path):
    """A question to implement X must not hand the student lora_edu's X: the notebook's own
    imports name only checkers and the tools a question says to use."""
    nb = jupytext.read(source, fmt="md:myst")
    solutions = {s for q in _questions(source) for s in q["solutions"] + q["tests"]}
    imported = [line for c in nb.cells if c.cell_type == "code" and c.source not in solutions
                for line in c.source.splitlines() if line.startswith("from lora_edu")]
    allowed = ("from lora_edu.checks import", "from lora_edu.quant import nf4_codebook",
               "from lora_edu.lora import", "from lora_edu.models import")
    assert all(line.startswith(allowed) for line in imported), imported


def test_without_lora_edu_refuses_the_reference_and_restores_it():
    import lora_edu.linalg as linalg
    space: dict = {}
    exec(asg.WITHOUT_LORA_EDU, space)
    W = torch.eye(3, dtype=torch.float64)
    reference = linalg.numerical_rank

    def borrowed(W):
        from lora_edu.linalg import numerical_rank
        return numerical_rank(W)

    def own(W):
        return int(torch.linalg.matrix_rank(W))
    with pytest.raises(AssertionError, match="write it yourself"):
        space["without_lora_edu"](borrowed)(W)
    assert space["without_lora_edu"](own)(W) == 3
    assert linalg.numerical_rank is reference and reference(W) == 3
    assert space["without_lora_edu"](borrowed, allow=("numerical_rank",))(W) == 3


def test_the_build_adds_the_helper_to_hidden_tests_that_use_it():
    nb = asg.master(ROOT / "assignments" / "12_combining_adapters.md")
    uses = [c.source for c in nb.cells if "without_lora_edu(linear_one)" in c.source]
    assert uses and all("def without_lora_edu" in s for s in uses)
    assert "lora_edu_wrong" not in nb.metadata


def test_a_tag_pins_the_student_install_line():
    cell = asg.setup_cell("01_rank", "v0.2.0")
    assert "lora-edu@v0.2.0" in cell.replace(" @ git+https://github.com/lora-edu/", "@") or \
        '@v0.2.0"' in cell
    assert '@v0.2.0"' not in asg.setup_cell("01_rank")


def test_colab_installs_are_pinned_to_requirements():
    """A chapter's bare ``%pip install --quiet peft`` becomes requirements.txt's pin."""
    pins = nt.pinned_versions()
    cell = 'if x:\n    %pip install --quiet peft\n    %pip install --quiet "lora-edu @ git+u@main"'
    assert f"%pip install --quiet peft=={pins['peft']}" in nt.pin_installs(cell)
    assert '"lora-edu @ git+u@main"' in nt.pin_installs(cell)
    for chapter in nt.chapters():
        for cell in nt.chapter_to_notebook(chapter).cells:
            for line in cell.source.splitlines():
                if line.strip().startswith("%pip install") and "lora-edu" not in line:
                    assert all("==" in n for n in line.split("--quiet")[1].split()), \
                        f"{chapter.name}: unpinned install in its notebook: {line.strip()}"


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
    # docstrings and prompts say what to compute, never the formula the solution returns
    prompts = [_normalised(d) for d in re.findall(r'"""(.*?)"""', text, re.S)]
    prompts += [_normalised(c.source) for c in student.cells if c.cell_type == "markdown"]
    results = [_normalised(line.split("return", 1)[1]) for s in solutions
               for line in s.splitlines() if line.strip().startswith("return ")]
    given = [r for r in results if len(r) >= 4 and any(r in d for d in prompts)]
    assert not given, f"{source.name}: a docstring or prompt states a solution's result: {given}"
    assert (tmp_path / "autograder" / f"{source.stem}-autograder.zip").exists()
