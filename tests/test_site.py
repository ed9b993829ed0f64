"""The built site, checked as a reader would see it (scripts/check_site.py).

The checks on the real site run when it has been built (``make book``); CI builds first and
sets ``LORA_EDU_REQUIRE_SITE=1`` so that a missing site or browser fails instead of skipping.
The checker itself is tested on small pages made here, so that it is known to catch problems.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import check_site  # noqa: E402

SITE = ROOT / "_build" / "html"
REQUIRED = os.environ.get("LORA_EDU_REQUIRE_SITE") == "1"


def _need(condition: bool, why: str) -> None:
    if not condition:
        if REQUIRED:
            pytest.fail(why)
        pytest.skip(why)


def _page(directory: Path, name: str, body: str) -> Path:
    path = directory / name
    path.write_text(f"<html><head></head><body><main>{body}</main></body></html>")
    return path


def test_link_checker_finds_missing_files_and_fragments(tmp_path):
    _page(tmp_path, "a.html", '<p id="here">x</p><a href="b.html#here">ok</a>'
                              '<a href="b.html#nowhere">bad anchor</a><img src="gone.png">'
                              '<a href="missing.html">bad file</a><a href="https://x.org/">ext</a>')
    _page(tmp_path, "b.html", '<h1 id="here">b</h1><a href="a.html#here">ok</a>')
    problems = check_site.broken_links(tmp_path)
    assert sorted(problems) == sorted([
        "a.html: b.html#nowhere (no element with id 'nowhere')",
        "a.html: gone.png (no such file)",
        "a.html: missing.html (no such file)",
    ])


@pytest.mark.skipif(check_site.CHROMIUM is None, reason="Debian's chromium is not installed")
def test_browser_check_catches_raw_math_warnings_escape_codes_and_broken_images(tmp_path):
    _page(tmp_path, "bad.html",
          r'<p>raw \(x^2\) math</p><img src="nothing.png">'
          '<div class="cell_output"><div class="output stderr"><pre>UserWarning: x</pre></div>'
          '<pre>\x1b[31mred\x1b[0m</pre></div><a class="problematic" href="#x">`</a>')
    problems = check_site.browser_problems(tmp_path, shots=None)
    text = "\n".join(problems)
    assert "raw math delimiter \\(" in text
    assert "image did not load: nothing.png" in text
    assert "output(s) on stderr" in text
    assert "raw escape codes" in text
    assert "error marker" in text


def test_built_site_has_no_broken_local_links_or_images():
    _need((SITE / "index.html").exists(), "the book has not been built: run `make book`")
    assert check_site.broken_links(SITE) == []


def test_built_site_reads_cleanly_in_a_browser_and_screenshots_are_saved():
    _need((SITE / "index.html").exists(), "the book has not been built: run `make book`")
    _need(check_site.CHROMIUM is not None, "Debian's chromium is not installed")
    shots = ROOT / "_build" / "screenshots"
    assert check_site.browser_problems(SITE, shots) == []
    for page in check_site.pages(SITE):
        name = page.relative_to(SITE).as_posix()[:-5].replace("/", "_")
        assert (shots / f"{name}.png").stat().st_size > 10_000, f"no screenshot of {name}"


def _chapter_pages() -> list[Path]:
    return sorted((SITE / "book").glob("[0-9][0-9]_*.html"))


def test_every_chapter_page_has_navigation_badge_and_bibliography():
    _need((SITE / "index.html").exists(), "the book has not been built: run `make book`")
    pages = _chapter_pages()
    assert len(pages) == len(list((ROOT / "book").glob("[0-9][0-9]_*.md")))
    for page in pages:
        html = page.read_text(encoding="utf-8")
        nav = re.search(r'class="prev-next-area">(.*?)</div>\s*</div>', html, re.S)
        assert nav, f"{page.name}: no previous/next navigation"
        targets = re.findall(r'class="(?:left-prev|right-next)"\s+href="([^"]+)"', nav.group(1))
        assert targets and all((page.parent / t).exists() for t in targets), page.name
        assert 'src="../_images/colab-badge.svg"' in html or "colab-badge.svg" in html, \
            f"{page.name}: no Colab badge"
        assert f"notebooks/{page.stem}.ipynb" in html, f"{page.name}: badge to the wrong notebook"
        assert 'class="citation"' in html, f"{page.name}: no bibliography"
