"""Look at the built site as a reader would, and check what a reader would notice.

Usage: python scripts/check_site.py [--html _build/html] [--shots _build/screenshots]

Two kinds of check over every page of the built book:

* **links** (pure Python, fast): every local ``href``/``src`` points at a file that exists,
  and every ``#fragment`` on a local page names an element that exists;
* **in the browser** (headless Chromium driven by Playwright, Debian's ``chromium``): math is
  typeset by the local MathJax (no raw ``\\(`` or ``$$`` left), every image loaded, no output
  shows a warning box (stderr), raw escape codes, or an empty widget placeholder; and a
  full-page screenshot of each page is saved for a person to look at.

Exit status 1 with a list of problems if anything fails.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

ROOT = Path(__file__).resolve().parents[1]
SKIP_DIRS = {"_static", "_sources", "_modules", "_images"}
SKIP_PAGES = {"genindex.html", "search.html", "py-modindex.html"}
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]


def pages(html_dir: Path) -> list[Path]:
    """The book's content pages (not Sphinx's index/search pages or copied sources)."""
    return sorted(p for p in html_dir.rglob("*.html")
                  if p.name not in SKIP_PAGES
                  and not SKIP_DIRS.intersection(p.relative_to(html_dir).parts))


class _Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []
        self.ids: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if value is None:
                continue
            if name == "id" or (tag == "a" and name == "name"):
                self.ids.add(value)
            if name in ("href", "src"):
                self.links.append(value)


def _parse(page: Path) -> _Collector:
    collector = _Collector()
    collector.feed(page.read_text(encoding="utf-8", errors="replace"))
    return collector


def broken_links(html_dir: Path) -> list[str]:
    """Local links and images that point nowhere, as ``page: link (why)`` lines."""
    problems: list[str] = []
    id_cache: dict[Path, set[str]] = {}
    for page in sorted(html_dir.rglob("*.html")):
        if SKIP_DIRS.intersection(page.relative_to(html_dir).parts):
            continue
        for link in _parse(page).links:
            parts = urlsplit(link)
            if parts.scheme or link.startswith(("//", "mailto:", "data:", "javascript:")):
                continue
            target = (page.parent / unquote(parts.path)).resolve() if parts.path else page
            name = page.relative_to(html_dir)
            if not target.exists():
                problems.append(f"{name}: {link} (no such file)")
                continue
            if parts.fragment and target.suffix == ".html":
                ids = id_cache.setdefault(target, _parse(target).ids)
                if unquote(parts.fragment) not in ids:
                    problems.append(f"{name}: {link} (no element with id "
                                    f"{parts.fragment!r})")
    return problems


# Run in the page: what a reader would see that is wrong.
_BROWSER_CHECK = r"""
() => {
  const problems = [];
  const main = document.querySelector("main") || document.body;
  const text = main.innerText;
  const rawMath = [...main.querySelectorAll(".math, .MathJax_Preview")]
      .filter(el => !el.querySelector("mjx-container") && el.tagName !== "MJX-CONTAINER");
  if (rawMath.length) problems.push(`${rawMath.length} math element(s) not typeset`);
  for (const token of ["\\(", "\\)", "\\[", "$$"]) {
    const outside = [...main.querySelectorAll("p, li, td, h1, h2, h3, dd")]
        .filter(el => el.innerText.includes(token) && !el.closest("pre, code, .highlight"));
    if (outside.length) problems.push(`raw math delimiter ${token} in text`);
  }
  const broken = [...document.images].filter(img => !img.complete || img.naturalWidth === 0);
  for (const img of broken) problems.push(`image did not load: ${img.getAttribute("src")}`);
  const markup = main.querySelectorAll(".problematic, .system-message");
  if (markup.length) problems.push(`${markup.length} reStructuredText/MyST error marker(s)`);
  const stderr = main.querySelectorAll(".output.stderr, .stderr");
  if (stderr.length) problems.push(`${stderr.length} output(s) on stderr (warning box)`);
  const outputs = [...main.querySelectorAll(".cell_output")].map(el => el.innerText).join("\n");
  if (/\x1b\[|\[0m|\[\d+;\d+m/.test(outputs)) problems.push("raw escape codes in an output");
  if (/Error displaying widget|IProgress not found|jupyter-widgets/.test(outputs))
    problems.push("an empty widget / progress placeholder in an output");
  if (/Traceback \(most recent call last\)/.test(outputs) &&
      !main.querySelector(".tag_raises-exception"))
    problems.push("a traceback in an output of a cell not tagged raises-exception");
  return problems;
}
"""


def browser_problems(html_dir: Path, shots: Path | None) -> list[str]:
    """Open every page in headless Chromium; return problems, save full-page screenshots."""
    from playwright.sync_api import sync_playwright

    problems: list[str] = []
    if shots is not None:
        shots.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        for path in pages(html_dir):
            name = path.relative_to(html_dir).as_posix()
            page.goto(path.as_uri())
            page.wait_for_load_state("load")
            page.wait_for_function(
                "() => !window.MathJax || (MathJax.startup && MathJax.startup.promise)",
                timeout=15_000)
            page.evaluate("() => window.MathJax ? MathJax.startup.promise : null")
            problems += [f"{name}: {p}" for p in page.evaluate(_BROWSER_CHECK)]
            if shots is not None:
                out = shots / (re.sub(r"[^A-Za-z0-9_.-]", "_", name[:-5]) + ".png")
                page.screenshot(path=str(out), full_page=True)
        browser.close()
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--html", type=Path, default=ROOT / "_build" / "html")
    parser.add_argument("--shots", type=Path, default=ROOT / "_build" / "screenshots")
    parser.add_argument("--no-browser", action="store_true", help="only check links")
    args = parser.parse_args()
    if not (args.html / "index.html").exists():
        print(f"no built site in {args.html}: run `make book` first", file=sys.stderr)
        return 1
    problems = broken_links(args.html)
    checked = len(pages(args.html))
    if not args.no_browser:
        if CHROMIUM is None:
            print("chromium not found: install Debian's `chromium` package", file=sys.stderr)
            return 1
        problems += browser_problems(args.html, args.shots)
        print(f"screenshots of {checked} pages in {args.shots}")
    for problem in problems:
        print(f"PROBLEM {problem}")
    print(f"{checked} pages checked, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
