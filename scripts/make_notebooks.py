"""Regenerate notebooks/*.ipynb (for Colab) from the chapters in book/.

Usage: python scripts/make_notebooks.py      (or: make notebooks)

Writes one notebook per chapter, without its solutions (code cells tagged ``solution`` and
``{admonition} Solution`` blocks; see notebook_tools.strip_solutions), and removes notebooks
whose chapter no longer exists. The website keeps the solutions in collapsed toggles.
"""

from __future__ import annotations

import sys

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from notebook_tools import NOTEBOOKS, chapter_to_notebook, chapters, notebook_path, render  # noqa: E402


def main() -> int:
    NOTEBOOKS.mkdir(exist_ok=True)
    wanted = {notebook_path(c) for c in chapters()}
    for chapter in chapters():
        target = notebook_path(chapter)
        text = render(chapter_to_notebook(chapter))
        if not target.exists() or target.read_text(encoding="utf-8") != text:
            target.write_text(text, encoding="utf-8")
            print(f"wrote {target.relative_to(NOTEBOOKS.parent)}")
    for extra in sorted(set(NOTEBOOKS.glob("*.ipynb")) - wanted):
        extra.unlink()
        print(f"removed {extra.relative_to(NOTEBOOKS.parent)} (no chapter in book/)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
