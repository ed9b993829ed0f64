"""The built site, checked as a reader would see it (scripts/check_site.py).

The checks on the real site run when it has been built (``make book``); CI builds first and
sets ``LORA_EDU_REQUIRE_SITE=1`` so that a missing site or browser fails instead of skipping.
The checker itself is tested on small pages made here, so that it is known to catch problems.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
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


def _page(directory: Path, name: str, body: str, head: str = "") -> Path:
    path = directory / name
    path.write_text(f"<html><head><meta charset='utf-8'>{head or VIEWPORT}</head><body>"
                    f"<main>{body}"
                    "</main></body></html>", encoding="utf-8")
    return path


VIEWPORT = '<meta name="viewport" content="width=device-width, initial-scale=1">'
RICH_TABLE = "┏━━━┳━━━┓\n┃ a ┃ b ┃\n┡━━━╇━━━┩\n│ 1 │ 2 │\n└───┴───┘"


def test_reader_check_finds_text_tables_missing_alt_text_and_unnamed_svg_figures(tmp_path):
    _page(tmp_path, "bad.html",
          f'<div class="cell_output"><div class="output text_plain"><pre>{RICH_TABLE}</pre>'
          '</div></div><img src="plot.png"><img src="empty.png" alt=" ">'
          '<img src="x.png" alt="../_build/jupyter_execute/abc123.png">'
          '<img src="y.png" alt="figure_3.png">'
          '<figure><svg viewBox="0 0 10 10"><rect width="5" height="5"/></svg></figure>')
    _page(tmp_path, "good.html",
          f'<div class="cell_input"><div class="highlight"><pre>{RICH_TABLE}</pre></div></div>'
          '<pre>book/\n├── 01_rank.md\n└── 02_svd.md</pre>'  # a tree is not a table
          '<img src="plot.png" alt="a plot"><img src="icon.png" role="presentation">'
          '<figure><svg><title>a diagram</title><rect/></svg></figure>'
          '<svg aria-hidden="true"><path d="M0 0"/></svg><br/><p>text<p>more'
          '<table><tr><td>1</td></tr></table>')
    assert check_site.reader_problems(tmp_path) == [
        "bad.html: a box-drawn text table in a <pre> (use lora_edu.report.show_table): "
        "┏━━━┳━━━┓",
        "bad.html: image without alt text: plot.png",
        "bad.html: image without alt text: empty.png",
        "bad.html: image whose alt text is a file name, not a description: "
        "../_build/jupyter_execute/abc123.png",
        "bad.html: image whose alt text is a file name, not a description: figure_3.png",
        "bad.html: inline SVG figure without a <title> or aria-label",
    ]


def test_redirect_page_is_not_a_content_page(tmp_path):
    (tmp_path / "index.html").write_text('<meta http-equiv="Refresh" content="0; url=a.html" />')
    _page(tmp_path, "a.html", "<p>a</p>")
    assert [p.name for p in check_site.pages(tmp_path)] == ["a.html"]


def _animation_html(frozen: bool) -> str:
    """A real matplotlib jshtml slider (two frames that differ), optionally with its slider
    disconnected from the image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import animation

    fig, ax = plt.subplots(figsize=(2, 2), dpi=40)
    (line,) = ax.plot([0, 1], [0, 0])
    ax.set_ylim(-1, 1)

    def frame(i):
        line.set_ydata([0, i])
        return [line]

    html = animation.FuncAnimation(fig, frame, frames=2).to_jshtml()
    plt.close(fig)
    html = re.sub(r'<link rel="stylesheet"[^>]*>', "", html)  # no CDN in a test
    html = html.replace('<img id="', '<img alt="a moving line" id="', 1)
    # matplotlib's slider is 374 px wide: with any margin it pushes a phone's page sideways
    html = html.replace("width: 374px;", "width: 100%; max-width: 374px;")
    if frozen:
        html = re.sub(r'oninput="[^"]*"', "", html)
    return html


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


@pytest.mark.skipif(check_site.CHROMIUM is None, reason="Debian's chromium is not installed")
def test_browser_check_moves_sliders_catches_sideways_scroll_and_counts_sliders(tmp_path):
    _page(tmp_path, "a_moves.html", _animation_html(frozen=False))
    _page(tmp_path, "b_frozen.html", _animation_html(frozen=True))
    _page(tmp_path, "c_wide.html", '<div style="width: 900px">a wide figure</div>')
    _page(tmp_path, "d_scrolls.html",
          '<div style="overflow-x: auto"><pre style="width: 900px">a wide code cell</pre></div>'
          '<div style="overflow-x: auto"><table style="width: 900px"><tr><td>1</td></tr>'
          '</table></div>')
    problems = check_site.browser_problems(tmp_path, shots=tmp_path / "shots", search=False,
                                           min_sliders=3)
    assert "b_frozen.html: slider 1: moving it did not change the image" in problems
    assert not [p for p in problems if p.startswith("a_moves.html")], problems
    wide = [p for p in problems if p.startswith("c_wide.html (phone)")]
    assert len(wide) == 1 and "scrolls sideways at 375 px" in wide[0] and "<div>" in wide[0]
    assert not [p for p in problems if p.startswith("d_scrolls.html")], problems
    assert "the site has 2 slider figure(s); at least 3 expected" in problems
    assert (tmp_path / "shots" / "phone" / "c_wide.png").stat().st_size > 1000
    _page(tmp_path, "e_no_viewport.html", "<p>zoomed out on a phone</p>", head="<title>x</title>")
    problems = check_site.browser_problems(tmp_path, shots=None, search=False)
    assert any(p.startswith("e_no_viewport.html (phone): no <meta name=viewport>")
               for p in problems), problems


@pytest.mark.skipif(check_site.CHROMIUM is None, reason="Debian's chromium is not installed")
def test_search_check_needs_the_chapter_among_the_results(tmp_path):
    _page(tmp_path, "03_factorisation.html", "<h1>Factorisation as optimisation</h1>")
    _page(tmp_path, "other.html", "<h1>Other</h1>")
    script = """<script>
      const q = new URLSearchParams(location.search).get("q");
      const hit = {{"Factorisation": "{target}"}}[q];
      if (hit) document.querySelector("main").innerHTML =
          `<ul class="search"><li><a href="${{hit}}">found</a></li></ul>`;
    </script>"""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=check_site.CHROMIUM,
                                     args=check_site.CHROMIUM_ARGS)
        page = browser.new_page()
        (tmp_path / "search.html").write_text(
            "<html><body><main></main>" + script.format(target="03_factorisation.html")
            + "</body></html>")
        assert check_site.search_problems(page, tmp_path) == []
        (tmp_path / "search.html").write_text(
            "<html><body><main></main>" + script.format(target="other.html")
            + "</body></html>")
        assert check_site.search_problems(page, tmp_path) == [
            "search for 'Factorisation' did not find 03_factorisation.html"]
        browser.close()


def test_diagrams_are_drawn_by_the_script_and_labelled():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_diagrams.py"),
                             "--check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    for name in ["lora_layer", "merging", "multi_adapter_batching", "qlora_dataflow",
                 "ddp_vs_fsdp"]:
        svg = ET.parse(ROOT / "book" / "images" / f"{name}.svg").getroot()
        ns = "{http://www.w3.org/2000/svg}"
        assert svg.get("role") == "img" and svg.find(f"{ns}title").text, name
        assert len(svg.find(f"{ns}desc").text) > 80, name
        assert len(svg.findall(f".//{ns}text")) > 5, f"{name}: text is real <text>"


def test_built_site_has_no_broken_local_links_or_images():
    _need((SITE / "index.html").exists(), "the book has not been built: run `make book`")
    assert check_site.broken_links(SITE) == []


def test_built_site_reads_cleanly_in_a_browser_and_screenshots_are_saved():
    _need((SITE / "index.html").exists(), "the book has not been built: run `make book`")
    _need(check_site.CHROMIUM is not None, "Debian's chromium is not installed")
    shots = ROOT / "_build" / "screenshots"
    assert check_site.browser_problems(SITE, shots, min_sliders=check_site.MIN_SLIDERS) == []
    for page in check_site.pages(SITE):
        name = page.relative_to(SITE).as_posix()[:-5].replace("/", "_")
        assert (shots / f"{name}.png").stat().st_size > 10_000, f"no screenshot of {name}"
        assert (shots / "phone" / f"{name}.png").stat().st_size > 10_000, \
            f"no phone screenshot of {name}"


def test_built_site_tables_are_html_and_every_image_has_alt_text():
    _need((SITE / "index.html").exists(), "the book has not been built: run `make book`")
    assert check_site.reader_problems(SITE) == []
    tables = sum(p.read_text(encoding="utf-8").count('class="dataframe lora-table"')
                 for p in _chapter_pages())
    assert tables > 0, "no lora_edu.report table on any chapter page"


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
