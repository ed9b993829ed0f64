"""Graded assignments for courses: build them with Otter Assign, check their autograders.

    python scripts/assignments.py build          # make assignments
    python scripts/assignments.py grade-check    # make grade-check (builds first if needed)

**Sources.** ``assignments/NN_<topic>.md`` is the Otter master notebook of chapter NN's graded
exercises, in MyST markdown (jupytext), one file per chapter. Its front matter names the chapter
and the exercises it grades by a phrase of their statement (``lora_edu_assignment``);
``tests/test_assignments.py`` checks that every phrase is still in that chapter's "Exercises"
section, so a rewritten exercise cannot silently leave its assignment behind. Each question
follows Otter's format (raw cells ``# BEGIN QUESTION`` … ``# END QUESTION``, the solution
between ``# BEGIN SOLUTION`` and ``# END SOLUTION``, tests between ``# BEGIN TESTS`` and
``# END TESTS``); tests call :mod:`lora_edu.checks` where a checker exists, so a student sees
the checker's explanation of the first mismatch. A checker accepts any correct function,
lora_edu's own reference included, so each such test first refuses a function whose
``__module__`` is lora_edu's, and the hidden tests run the student's code with every lora_edu
function and class replaced by one that raises (:data:`WITHOUT_LORA_EDU`, added by the build
to each hidden test that calls ``without_lora_edu``): a wrapper around the reference, or an
import of it inside the answer, scores nothing. Every question has a public test and a
``grader.check`` cell, but **points sit on the hidden tests only**: a public test
(``points: 0``) lets a student check an answer before submitting, mostly its type or shape,
and earns nothing, so a well-typed wrong answer scores zero. Docstrings and prompts say what
to compute, never the formula that answers.

**Build** (``_build/assignments/``): this script adds the assignment configuration and a set-up
cell (in Colab it installs the pinned ``otter-grader`` and ``lora-edu``) to each source, writes
the master as ``masters/NN.ipynb`` and runs ``otter assign`` on it, which gives

* ``student/NN_<topic>.ipynb``: the notebook to hand out, solutions replaced by ``...``;
* ``autograder/NN_<topic>-autograder.zip``: what ``otter run`` grades submissions with;
* ``solutions/NN_<topic>.ipynb``: the reference solution (for the instructor).

``--tag v0.2.0`` (``make assignments TAG=v0.2.0``) pins the set-up cell's install line to
that tag (or commit) of lora-edu instead of the book's branch, so that a class grades against
the version it was handed.

**Grade check**, graded by ``otter run`` exactly as a class's submissions would be (no Docker):
every reference solution must score full marks, every unchanged student notebook zero, and
every *wrong* notebook zero. The wrong notebook is the student notebook with each question's
answer from the source's front matter (``lora_edu_wrong``: question name -> code) put before its
check cell: well-typed but wrong values (zeros, an unchanged input, the opposite booleans) or a
thin wrapper around lora_edu's own reference, the two ways a submission could score without
the work.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jupytext
import nbformat

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ROOT / "assignments"
OUT = ROOT / "_build" / "assignments"
OTTER = str(Path(sys.executable).with_name("otter"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from notebook_tools import install_line  # noqa: E402

CONFIG = """# ASSIGNMENT CONFIG
name: {name}
init_cell: false
check_all_cell: false
export_cell: false
generate: true
"""


# Prepended by the build to every hidden test that calls it (a test file must stand alone).
WITHOUT_LORA_EDU = '''
def without_lora_edu(fn, allow=()):
    """fn, but while it runs every lora_edu function and class (in lora_edu's modules and in
    fn's globals; names in ``allow`` excepted) raises when called from outside lora_edu:
    calling the reference is no answer (lora_edu's own code still calls its helpers)."""
    import sys

    def guard(value):
        def guarded(*args, **kwargs):
            if (sys._getframe(1).f_globals.get("__name__") or "").split(".")[0] != "lora_edu":
                raise AssertionError("the answer calls lora_edu's own implementation of "
                                     f"{getattr(value, '__name__', value)}; write it yourself")
            return value(*args, **kwargs)
        return guarded

    def run(*args, **kwargs):
        spaces = [vars(m) for name, m in list(sys.modules.items())
                  if name.split(".")[0] == "lora_edu" and m is not None]
        spaces.append(getattr(fn, "__globals__", {}))
        saved = [(space, key, value) for space in spaces for key, value in list(space.items())
                 if callable(value) and key not in allow and value is not fn
                 and str(getattr(value, "__module__", None) or "").startswith("lora_edu")]
        for space, key, value in saved:
            space[key] = guard(value)
        try:
            return fn(*args, **kwargs)
        finally:
            for space, key, value in saved:
                space[key] = value
    return run
'''.strip()


def otter_pin() -> str:
    """``otter-grader==X`` as pinned in requirements.txt (students grade with the same)."""
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        if line.startswith("otter-grader=="):
            return line.strip()
    raise SystemExit("requirements.txt pins no otter-grader version")


def setup_cell(name: str, tag: str | None = None) -> str:
    pip = install_line(tag).replace("%pip install --quiet ", f"%pip install --quiet {otter_pin()} ")
    return (f"# Set-up. In Colab this installs the course's pinned packages first.\n"
            f"import sys\n\nif \"google.colab\" in sys.modules:\n    {pip}\n\n"
            f"import otter\n\ngrader = otter.Notebook(\"{name}.ipynb\")")


def sources() -> list[Path]:
    return sorted(SOURCES.glob("[0-9][0-9]_*.md"))


TEST_CONFIG_END = '""" # END TEST CONFIG'


def with_helper(test: str) -> str:
    """A hidden test's code with :data:`WITHOUT_LORA_EDU` after its configuration, if it
    calls ``without_lora_edu``."""
    if "without_lora_edu(" not in test or TEST_CONFIG_END not in test:
        return test
    config, body = test.split(TEST_CONFIG_END, 1)
    return f"{config}{TEST_CONFIG_END}\n{WITHOUT_LORA_EDU}\n\n{body.lstrip(chr(10))}"


def master(source: Path, tag: str | None = None) -> nbformat.NotebookNode:
    """The Otter master notebook of ``source``: its cells after a configuration cell, with the
    set-up cell after the title and the helper in the hidden tests that use it."""
    nb = jupytext.read(source, fmt="md:myst")
    name = source.stem
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.source = with_helper(cell.source)
    title = next(i for i, c in enumerate(nb.cells) if c.cell_type == "markdown")
    nb.cells.insert(title + 1, nbformat.v4.new_code_cell(setup_cell(name, tag)))
    nb.cells.insert(0, nbformat.v4.new_raw_cell(CONFIG.format(name=name).strip()))
    nb.metadata.pop("jupytext", None)
    nb.metadata.pop("lora_edu_wrong", None)  # the wrong answers stay out of what students get
    for i, cell in enumerate(nb.cells):
        cell.id = f"{name[:2]}-{i:03d}"
    return nb


def wrong_answers(source: Path) -> dict[str, str]:
    """``{question name: code}`` of the wrong answers in ``source``'s front matter."""
    return dict(jupytext.read(source, fmt="md:myst").metadata.get("lora_edu_wrong", {}))


def wrong_notebook(source: Path, student: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """``student`` (the notebook handed out) with each question's wrong answer as a code cell
    just before its ``grader.check`` cell: what a submission that skipped the work looks like."""
    answers = wrong_answers(source)
    nb = nbformat.from_dict(json.loads(json.dumps(student)))
    cells = []
    for cell in nb.cells:
        for name, code in answers.items():
            if cell.cell_type == "code" and f'grader.check("{name}")' in cell.source:
                cells.append(nbformat.v4.new_code_cell(code.strip()))
                cells[-1].id = f"{source.stem[:2]}-wrong-{name}"[:64]
        cells.append(cell)
    nb.cells = cells
    return nb


def build_one(source: Path, tag: str | None = None) -> tuple[str, float]:
    """``otter assign`` one master; returns (name, seconds)."""
    started = time.perf_counter()
    name = source.stem
    masters = OUT / "masters"
    masters.mkdir(parents=True, exist_ok=True)
    path = masters / f"{name}.ipynb"
    nbformat.write(master(source, tag), path)
    with tempfile.TemporaryDirectory() as tmp:
        dist = Path(tmp) / "dist"
        proc = subprocess.run([OTTER, "assign", "--no-pdfs", "--no-run-tests", str(path),
                               str(dist)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"otter assign failed on {source.name}:\n{proc.stdout}\n"
                               f"{proc.stderr}")
        (zip_path,) = (dist / "autograder").glob("*.zip")
        for sub in ("student", "autograder", "solutions"):
            (OUT / sub).mkdir(parents=True, exist_ok=True)
        shutil.copy(zip_path, OUT / "autograder" / f"{name}-autograder.zip")
        shutil.copy(dist / "student" / f"{name}.ipynb", OUT / "student" / f"{name}.ipynb")
        shutil.copy(dist / "autograder" / f"{name}.ipynb", OUT / "solutions" / f"{name}.ipynb")
    (OUT / "wrong").mkdir(parents=True, exist_ok=True)
    student = nbformat.read(OUT / "student" / f"{name}.ipynb", as_version=4)
    nbformat.write(wrong_notebook(source, student), OUT / "wrong" / f"{name}.ipynb")
    return name, time.perf_counter() - started


def build(workers: int = 2, tag: str | None = None) -> int:
    started = time.perf_counter()
    if OUT.exists():
        shutil.rmtree(OUT)
    with ThreadPoolExecutor(workers) as pool:
        for name, seconds in pool.map(lambda s: build_one(s, tag), sources()):
            print(f"built {name} ({seconds:.1f} s)", flush=True)
    print(f"{len(sources())} assignments in {OUT.relative_to(ROOT)} "
          f"({time.perf_counter() - started:.0f} s); students install "
          f"{install_line(tag).split('--quiet ')[1]}")
    return 0


def grade(notebook: Path, autograder: Path) -> tuple[float, float]:
    """(score, max score) that ``otter run`` gives ``notebook``."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "LORA_EDU_PROGRESS": "static"}
        proc = subprocess.run([OTTER, "run", "--no-logo", "-a", str(autograder), "-o", tmp,
                               str(notebook)], capture_output=True, text=True, env=env)
        results = Path(tmp) / "results.json"
        if not results.exists():
            raise RuntimeError(f"otter run wrote no results for {notebook}:\n{proc.stdout}\n"
                               f"{proc.stderr}")
        tests = json.loads(results.read_text())["tests"]
    graded = [t for t in tests if t.get("max_score") is not None]
    return (sum(t.get("score") or 0 for t in graded), sum(t["max_score"] for t in graded))


def grade_check(workers: int = 2) -> int:
    if not (OUT / "wrong").exists() or len(list((OUT / "wrong").glob("*.ipynb"))) != \
            len(sources()):
        build(workers)
    started = time.perf_counter()
    jobs = [(name, kind, OUT / folder / f"{name}.ipynb",
             OUT / "autograder" / f"{name}-autograder.zip")
            for name in (s.stem for s in sources())
            for kind, folder in (("reference", "solutions"), ("student", "student"),
                                 ("wrong", "wrong"))]

    def run(job):
        name, kind, notebook, autograder = job
        t = time.perf_counter()
        score, top = grade(notebook, autograder)
        return name, kind, score, top, time.perf_counter() - t

    failures = []
    with ThreadPoolExecutor(workers) as pool:
        for name, kind, score, top, seconds in pool.map(run, jobs):
            want = top if kind == "reference" else 0.0
            ok = top > 0 and abs(score - want) < 1e-9
            print(f"{'ok ' if ok else 'BAD'} {name:28s} {kind:9s} {score:g} / {top:g} "
                  f"({seconds:.1f} s)", flush=True)
            if not ok:
                failures.append(f"{name} ({kind}): {score:g} of {top:g}, expected {want:g}")
    print(f"graded {len(jobs)} notebooks in {time.perf_counter() - started:.0f} s")
    if failures:
        print("grade-check FAILED:\n  " + "\n  ".join(failures))
        return 1
    print("grade-check passed: every reference solution scores full marks, every unchanged "
          "student notebook and every wrong (well-typed or borrowed) one zero")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["build", "grade-check"])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--tag", default=None,
                        help="lora-edu tag or commit the student notebooks install (default: "
                             "the book's branch)")
    args = parser.parse_args()
    if args.command == "build":
        return build(args.workers, args.tag or None)
    return grade_check(args.workers)


if __name__ == "__main__":
    raise SystemExit(main())
