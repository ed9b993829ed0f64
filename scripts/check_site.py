"""Look at the built site as a reader would, and check what a reader would notice.

Usage: python scripts/check_site.py [--html _build/html] [--shots _build/screenshots]

Two kinds of check over every page of the built book:

* **in the HTML** (pure Python, fast): every local ``href``/``src`` points at a file that
  exists, and every ``#fragment`` on a local page names an element that exists; no table is
  box-drawn text in a ``<pre>`` (rich's ┏━┃ outside a code cell's source: tables are HTML
  tables); every ``<img>`` has alt text and every inline ``<svg>`` figure a title or label;
* **in the browser** (headless Chromium driven by Playwright, Debian's ``chromium``): math is
  typeset by the local MathJax (no raw ``\\(`` or ``$$`` left), every image loaded, no output
  shows a warning box (stderr), raw escape codes, or an empty widget placeholder; every
  slider (matplotlib's jshtml animation) changes its image when moved, and the site has at
  least ``--min-sliders`` of them; at a phone's width (375 px) no page scrolls sideways (code
  cells and wide tables scroll inside their own box); the built-in search finds a chapter by a
  word of its title; and full-page screenshots of each page, desktop and phone, are saved for
  a person to look at (``<shots>/`` and ``<shots>/phone/``).

Exit status 1 with a list of problems if anything fails.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from collections.abc import Sequence
from fnmatch import fnmatch
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

ROOT = Path(__file__).resolve().parents[1]
SKIP_DIRS = {"_static", "_sources", "_modules", "_images"}
SKIP_PAGES = {"genindex.html", "search.html", "py-modindex.html"}
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
TIMEOUT_MS = 120_000
MIN_SLIDERS = 3  # figures to play with (issue: at least three, each checked by moving it)
PHONE = {"width": 375, "height": 812}
DESKTOP = {"width": 1280, "height": 900}
# Box-drawing characters that only tables have (corners and crossings; a directory tree's
# ├── └── has none of them).
TABLE_BOX = re.compile("[┏┓┌┐╭╮┳┬┼╋╇╪╔╗╦╬┡┩]")
BOX_DRAWING = re.compile("[\u2500-\u257f]")
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source",
        "track", "wbr"}
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]


def pages(html_dir: Path) -> list[Path]:
    """The book's content pages (not Sphinx's index/search pages or copied sources)."""
    return sorted(p for p in html_dir.rglob("*.html")
                  if p.name not in SKIP_PAGES
                  and not SKIP_DIRS.intersection(p.relative_to(html_dir).parts)
                  and not _is_redirect(p))


def _is_redirect(page: Path) -> bool:
    """Sphinx's index.html that only forwards to the root page (a meta refresh)."""
    head = page.read_text(encoding="utf-8", errors="replace")[:300].lower()
    return 'http-equiv="refresh"' in head and "<body" not in head


def _looks_like_a_path(alt: str) -> bool:
    """True for alt text that names a file (what MyST-NB writes when a figure has no alt
    text: ``_build/jupyter_execute/…/abc123.png``) instead of describing the figure."""
    return (" " not in alt and ("/" in alt or "\\" in alt)) or \
        bool(re.fullmatch(r"\S+\.(png|jpe?g|svg|gif|webp)", alt, re.IGNORECASE))


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
        parsed = _parse(page)
        id_cache[page.resolve()] = parsed.ids
        for link in parsed.links:
            parts = urlsplit(link)
            if parts.scheme or link.startswith(("//", "mailto:", "data:", "javascript:")):
                continue
            target = (page.parent / unquote(parts.path)).resolve() if parts.path else \
                page.resolve()
            name = page.relative_to(html_dir)
            if not target.exists():
                problems.append(f"{name}: {link} (no such file)")
                continue
            if parts.fragment and target.suffix == ".html":
                if target not in id_cache:  # parse each page once (not once per link)
                    id_cache[target] = _parse(target).ids
                ids = id_cache[target]
                if unquote(parts.fragment) not in ids:
                    problems.append(f"{name}: {link} (no element with id "
                                    f"{parts.fragment!r})")
    return problems


class _Reader(HTMLParser):
    """What a screen reader and a phone would trip over: box-drawn <pre> tables outside code
    cells' source, images without alt text, inline SVG figures without a title or label."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[tuple[str, str]] = []  # (tag, class) of the open elements
        self.pre: list[str] | None = None
        self.svg_named: list[bool] = []
        self.problems: list[str] = []
        self._title_in_svg = False

    def _inside(self, cls: str) -> bool:
        return any(cls in c.split() for _, c in self.stack)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: (v or "") for k, v in attrs}
        if tag == "img":
            hidden = a.get("aria-hidden") == "true" or a.get("role") in ("presentation", "none")
            alt = a.get("alt", "").strip()
            if not alt and not hidden:
                self.problems.append(f"image without alt text: {a.get('src', '?')[:80]}")
            elif alt and _looks_like_a_path(alt):
                self.problems.append(f"image whose alt text is a file name, not a description: "
                                     f"{alt[:80]}")
        if tag == "svg":
            hidden = a.get("aria-hidden") == "true" or a.get("role") in ("presentation", "none")
            named = bool(a.get("aria-label", "").strip() or a.get("aria-labelledby"))
            figure = self._inside("figure") or any(t == "figure" for t, _ in self.stack) or \
                a.get("role") == "img"
            # an icon (aria-hidden) needs no name; a figure does (title, aria-label)
            self.svg_named.append(named or hidden or not figure)
        if tag == "title" and self.svg_named:
            self.svg_named[-1] = True
        if tag == "pre" and self.pre is None and not self._inside("cell_input"):
            self.pre = []
        if tag not in VOID:
            self.stack.append((tag, a.get("class", "")))

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)
        if tag not in VOID:
            self.handle_endtag(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag == "svg" and self.svg_named:
            if not self.svg_named.pop():
                self.problems.append("inline SVG figure without a <title> or aria-label")
        if tag == "pre" and self.pre is not None:
            text = "".join(self.pre)
            lines = [line for line in text.splitlines() if BOX_DRAWING.search(line)]
            if len(lines) >= 2 and TABLE_BOX.search(text):
                first = next((line.strip() for line in text.splitlines() if line.strip()), "")
                self.problems.append(f"a box-drawn text table in a <pre> (use "
                                     f"lora_edu.report.show_table): {first[:60]}")
            self.pre = None
        # close up to the matching tag (tolerates unclosed <p>, <li> and the like)
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i][0] == tag:
                del self.stack[i:]
                break

    def handle_data(self, data: str) -> None:
        if self.pre is not None:
            self.pre.append(data)


def reader_problems(html_dir: Path) -> list[str]:
    """Box-drawn <pre> tables, images without alt text and unnamed SVG figures, as
    ``page: problem`` lines, over the content pages."""
    problems: list[str] = []
    for page in pages(html_dir):
        reader = _Reader()
        reader.feed(page.read_text(encoding="utf-8", errors="replace"))
        reader.close()
        name = page.relative_to(html_dir).as_posix()
        problems += [f"{name}: {p}" for p in dict.fromkeys(reader.problems)]
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


# Run in the page at a phone's width: does the document itself scroll sideways? Overflow
# inside a box that scrolls (code cells, wide tables) does not count: it is clipped there.
_PHONE_CHECK = r"""
() => {
  const root = document.documentElement;
  const width = root.clientWidth;
  if (width > window.screen.width + 1)
    return [`no <meta name=viewport>: a phone lays the page out ${width} px wide and zooms out`];
  const wide = Math.max(root.scrollWidth, document.body.scrollWidth);
  if (wide <= width + 1) return [];
  const clipped = el => {
    for (let p = el.parentElement; p && p !== document.body; p = p.parentElement) {
      const o = getComputedStyle(p).overflowX;
      if (o === "auto" || o === "scroll" || o === "hidden" || o === "clip") return true;
    }
    return false;
  };
  const over = [...document.body.querySelectorAll("*")].filter(el => {
    const r = el.getBoundingClientRect();
    return r.width > 0 && r.right > width + 1 && !clipped(el);
  });
  const leaves = over.filter(el => !over.some(o => o !== el && el.contains(o)));
  const describe = el => {
    const cls = typeof el.className === "string" && el.className.trim()
        ? "." + el.className.trim().split(/\s+/).slice(0, 2).join(".") : "";
    const text = (el.innerText || el.getAttribute("src") || "").trim().replace(/\s+/g, " ");
    return `<${el.tagName.toLowerCase()}${cls}> to ${Math.round(el.getBoundingClientRect().right)}`
        + ` px "${text.slice(0, 50)}"`;
  };
  return [`scrolls sideways at ${width} px (the document is ${wide} px wide): ` +
          (leaves.slice(0, 3).map(describe).join("; ") || "no single element found")];
}
"""

# Move every jshtml slider to its last frame (with the keyboard, as a reader would) and see
# whether its image changed.
_SLIDERS = ".animation input[type=range]"


def _slider_problems(page) -> tuple[int, list[str]]:
    sliders = page.locator(_SLIDERS)
    n = sliders.count()
    problems = []
    if n:
        try:  # each Animation starts in a setTimeout: wait until every image has a frame
            page.wait_for_function(
                "() => [...document.querySelectorAll('.animation img')]"
                ".every(img => img.getAttribute('src'))", timeout=10_000)
        except Exception:  # noqa: BLE001  (reported below as a frozen slider)
            pass
    for k in range(n):
        slider = sliders.nth(k)
        image = page.locator(".animation").nth(k).locator("img").first
        before = image.get_attribute("src") or ""
        frames = int(slider.get_attribute("max") or 0)
        if frames < 1:
            problems.append(f"slider {k + 1} has a single frame")
            continue
        slider.focus()
        page.keyboard.press("End")
        after = image.get_attribute("src") or ""
        if not before or after == before:
            problems.append(f"slider {k + 1}: moving it did not change the image")
    return n, problems


def _title_word(html: str) -> str | None:
    """The longest word of a page's <h1> and <h2> headings (what a reader might search for)."""
    headings = re.findall(r"<h[12][^>]*>(.*?)</h[12]>", html, re.S)
    text = " ".join(re.sub(r"<[^>]+>", " ", h) for h in headings)
    words = re.findall(r"[A-Za-z]{4,}", text)
    return max(words, key=len) if words else None


def search_problems(page, html_dir: Path) -> list[str]:
    """Search the site (search.html?q=WORD) for the longest word of the first chapter's
    headings; the chapter must be among the results."""
    search = html_dir / "search.html"
    chapters = [p for p in pages(html_dir) if re.match(r"\d\d_", p.name)] or pages(html_dir)
    if not search.exists() or not chapters:
        return ["no search page (search.html) or no chapter to look for"]
    target = chapters[0]
    word = _title_word(target.read_text(encoding="utf-8", errors="replace"))
    if word is None:
        return [f"{target.name}: no heading word to search for"]
    page.goto(f"{search.as_uri()}?q={word}")
    try:
        page.wait_for_selector("ul.search li a", timeout=15_000)
    except Exception:  # noqa: BLE001  (no result at all)
        return [f"search for {word!r} found nothing"]
    hrefs = page.eval_on_selector_all("ul.search li a", "els => els.map(a => a.href)")
    if not any(target.as_uri() == h.split("?")[0].split("#")[0] for h in hrefs):
        return [f"search for {word!r} did not find {target.relative_to(html_dir).as_posix()}"]
    return []


def _open(page, path: Path) -> None:
    page.goto(path.as_uri(), wait_until="domcontentloaded")
    page.wait_for_load_state("load")
    page.wait_for_function(
        "() => !window.MathJax || (MathJax.startup && MathJax.startup.promise)",
        timeout=TIMEOUT_MS)
    page.evaluate("() => window.MathJax ? MathJax.startup.promise : null")


def browser_problems(html_dir: Path, shots: Path | None, *, phone: bool = True,
                     search: bool = True, min_sliders: int = 0,
                     only: Sequence[str] = ()) -> list[str]:
    """Open every page in headless Chromium, on a desktop and at a phone's width; return
    problems and save full-page screenshots (``shots/NAME.png``, ``shots/phone/NAME.png``).
    ``only``: glob patterns of the pages to open (all when empty)."""
    from playwright.sync_api import sync_playwright

    problems: list[str] = []
    if shots is not None:
        (shots / "phone").mkdir(parents=True, exist_ok=True)
    n_sliders = 0
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport=DESKTOP)
        small = browser.new_page(viewport=PHONE, device_scale_factor=1, is_mobile=True,
                                 has_touch=True) if phone else None
        for p in (page, small):  # long pages on a busy machine take a while to load
            if p is not None:
                p.set_default_timeout(TIMEOUT_MS)
        for path in pages(html_dir):
            if only and not any(fnmatch(path.relative_to(html_dir).as_posix(), g) for g in only):
                continue
            name = path.relative_to(html_dir).as_posix()
            shot = re.sub(r"[^A-Za-z0-9_.-]", "_", name[:-5]) + ".png"
            _open(page, path)
            problems += [f"{name}: {p}" for p in page.evaluate(_BROWSER_CHECK)]
            if shots is not None:
                page.screenshot(path=str(shots / shot), full_page=True)
            count, moved = _slider_problems(page)
            n_sliders += count
            problems += [f"{name}: {p}" for p in moved]
            if small is not None:
                _open(small, path)
                problems += [f"{name} (phone): {p}" for p in small.evaluate(_PHONE_CHECK)]
                if shots is not None:
                    small.screenshot(path=str(shots / "phone" / shot), full_page=True)
        if search:
            problems += search_problems(page, html_dir)
        browser.close()
    if n_sliders < min_sliders:
        problems.append(f"the site has {n_sliders} slider figure(s); at least {min_sliders} "
                        "expected")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--html", type=Path, default=ROOT / "_build" / "html")
    parser.add_argument("--shots", type=Path, default=ROOT / "_build" / "screenshots")
    parser.add_argument("--no-browser", action="store_true",
                        help="only the HTML checks (links, tables, alt text)")
    parser.add_argument("--only", action="append", default=[], metavar="GLOB",
                        help="open only these pages in the browser (e.g. 'book/01_*'); "
                             "repeatable; the slider minimum is then not enforced")
    parser.add_argument("--min-sliders", type=int, default=MIN_SLIDERS,
                        help="slider figures the site must have (default %(default)s)")
    args = parser.parse_args()
    if not (args.html / "index.html").exists():
        print(f"no built site in {args.html}: run `make book` first", file=sys.stderr)
        return 1
    problems = broken_links(args.html) + reader_problems(args.html)
    checked = len(pages(args.html))
    if not args.no_browser:
        if CHROMIUM is None:
            print("chromium not found: install Debian's `chromium` package", file=sys.stderr)
            return 1
        problems += browser_problems(args.html, args.shots, only=args.only,
                                     min_sliders=0 if args.only else args.min_sliders)
        print(f"screenshots of {checked} pages in {args.shots}")
    for problem in problems:
        print(f"PROBLEM {problem}")
    print(f"{checked} pages checked, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
