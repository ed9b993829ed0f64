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
``__module__`` is lora_edu's (a student who merely imports it scores nothing); a one-line
wrapper around it still passes, which only reading the submission catches. Every question has
a public test (a student can check before submitting) and a ``grader.check`` cell; docstrings
say what to compute, never the formula that answers.

**Build** (``_build/assignments/``): this script adds the assignment configuration and a set-up
cell (in Colab it installs the pinned ``otter-grader`` and ``lora-edu``) to each source, writes
the master as ``masters/NN.ipynb`` and runs ``otter assign`` on it, which gives

* ``student/NN_<topic>.ipynb``: the notebook to hand out, solutions replaced by ``...``;
* ``autograder/NN_<topic>-autograder.zip``: what ``otter run`` grades submissions with;
* ``solutions/NN_<topic>.ipynb``: the reference solution (for the instructor).

**Grade check**: every reference solution must score full marks and every unchanged student
notebook zero, graded by ``otter run`` exactly as a class's submissions would be (no Docker).
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


def otter_pin() -> str:
    """``otter-grader==X`` as pinned in requirements.txt (students grade with the same)."""
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        if line.startswith("otter-grader=="):
            return line.strip()
    raise SystemExit("requirements.txt pins no otter-grader version")


def setup_cell(name: str) -> str:
    pip = install_line().replace("%pip install --quiet ", f"%pip install --quiet {otter_pin()} ")
    return (f"# Set-up. In Colab this installs the course's pinned packages first.\n"
            f"import sys\n\nif \"google.colab\" in sys.modules:\n    {pip}\n\n"
            f"import otter\n\ngrader = otter.Notebook(\"{name}.ipynb\")")


def sources() -> list[Path]:
    return sorted(SOURCES.glob("[0-9][0-9]_*.md"))


def master(source: Path) -> nbformat.NotebookNode:
    """The Otter master notebook of ``source``: its cells after a configuration cell, with the
    set-up cell after the title."""
    nb = jupytext.read(source, fmt="md:myst")
    name = source.stem
    title = next(i for i, c in enumerate(nb.cells) if c.cell_type == "markdown")
    nb.cells.insert(title + 1, nbformat.v4.new_code_cell(setup_cell(name)))
    nb.cells.insert(0, nbformat.v4.new_raw_cell(CONFIG.format(name=name).strip()))
    nb.metadata.pop("jupytext", None)
    for i, cell in enumerate(nb.cells):
        cell.id = f"{name[:2]}-{i:03d}"
    return nb


def build_one(source: Path) -> tuple[str, float]:
    """``otter assign`` one master; returns (name, seconds)."""
    started = time.perf_counter()
    name = source.stem
    masters = OUT / "masters"
    masters.mkdir(parents=True, exist_ok=True)
    path = masters / f"{name}.ipynb"
    nbformat.write(master(source), path)
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
    return name, time.perf_counter() - started


def build(workers: int = 2) -> int:
    started = time.perf_counter()
    if OUT.exists():
        shutil.rmtree(OUT)
    with ThreadPoolExecutor(workers) as pool:
        for name, seconds in pool.map(build_one, sources()):
            print(f"built {name} ({seconds:.1f} s)", flush=True)
    print(f"{len(sources())} assignments in {OUT.relative_to(ROOT)} "
          f"({time.perf_counter() - started:.0f} s)")
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
    if not (OUT / "student").exists() or len(list((OUT / "student").glob("*.ipynb"))) != \
            len(sources()):
        build(workers)
    started = time.perf_counter()
    jobs = [(name, kind, OUT / folder / f"{name}.ipynb",
             OUT / "autograder" / f"{name}-autograder.zip")
            for name in (s.stem for s in sources())
            for kind, folder in (("reference", "solutions"), ("student", "student"))]

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
          "student notebook zero")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["build", "grade-check"])
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    return build(args.workers) if args.command == "build" else grade_check(args.workers)


if __name__ == "__main__":
    raise SystemExit(main())
