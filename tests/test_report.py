"""lora_edu.report: tables are HTML on the page and rich text in a terminal, with one format per
column; glue works without MyST-NB."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console

from lora_edu import report
from lora_edu.report import format_columns, glue, make_table, show_table, table_html

ROWS = [["a<b & σ‖", 1.67, 4_718_592], ["q, v", 1.787, 12], ["‖W‖₂", 0.2389, 3]]
COLUMNS = ["what", "ratio", "params"]


def _table(html: str) -> ET.Element:
    """The <table> element of the HTML fragment, parsed strictly (it must be well formed)."""
    match = re.search(r"<table.*</table>", html, re.S)
    assert match, "no <table> in the HTML"
    return ET.fromstring(match.group(0))


def _decimals(cell: str) -> tuple[str, int]:
    """(notation, decimals) of a formatted number: 'f' with its decimals, or 'e' with its
    mantissa decimals."""
    m = re.fullmatch(r"-?[\d,]+(?:\.(\d+))?(e[+-]\d+)?%?", cell)
    assert m, f"{cell!r} is not a formatted number"
    return ("e" if m.group(2) else "f"), len(m.group(1) or "")


def test_table_formats_and_right_aligns_numbers():
    table = make_table([["q, v", 4_718_592, 0.01234567]], ["modules", "params", "ratio"])
    assert [c.justify for c in table.columns] == ["left", "right", "right"]
    console = Console(record=True, width=80)
    console.print(table)
    text = console.export_text()
    assert "4,718,592" in text and "0.01235" in text


def test_html_table_has_caption_header_and_right_aligned_numeric_columns():
    html = table_html(ROWS, COLUMNS, title="Shapes & <norms> σ")
    table = _table(html)
    assert "lora-table" in table.get("class")
    assert table.find("caption").text == "Shapes & <norms> σ"  # escaped in the HTML, exact here
    assert [th.text for th in table.iter("th")] == COLUMNS
    body = table.find("tbody")
    classes = [[td.get("class").split() for td in tr] for tr in body]
    assert all("text" in row[0] and "num" in row[1] and "num" in row[2] for row in classes)
    # the table's own CSS right-aligns the numeric columns (for Colab, which has no site CSS)
    for j in (1, 2):
        assert re.search(rf"td\.col{j} \{{[^}}]*text-align: right", html)
        assert re.search(rf"th\.col{j} \{{[^}}]*text-align: right", html)
    assert not re.search(r"td\.col0 \{[^}]*text-align: right", html)


def test_html_escapes_text_and_keeps_unicode():
    html = table_html(ROWS, ["a & b", "<ratio>", "params"], title=None)
    assert "a&lt;b &amp; σ‖" in html and "<b &" not in html
    assert "&lt;ratio&gt;" in html and "a &amp; b" in html
    assert "<caption>" not in html  # no title, no empty caption
    cells = [td.text for td in _table(html).iter("td")]
    assert cells[0] == "a<b & σ‖" and "‖W‖₂" in cells


def test_one_format_per_float_column():
    cells, numeric = format_columns(ROWS, COLUMNS)
    assert numeric == [False, True, True]
    ratio = [row[1] for row in cells]
    assert ratio == ["1.670", "1.787", "0.239"]  # not 1.67 beside 1.787 beside 0.2389
    assert [row[2] for row in cells] == ["4,718,592", "12", "3"]  # integers exactly


def test_caller_formats_per_column_and_scientific_for_wide_ranges():
    rows = [[1e-7, 0.5, 3], [0.3, 0.25, 4]]
    cells, _ = format_columns(rows, ["gap", "p", "n"], numeric_format={"p": "{:.1%}"})
    assert [r[0] for r in cells] == ["1.000e-07", "3.000e-01"]
    assert [r[1] for r in cells] == ["50.0%", "25.0%"]
    cells, _ = format_columns(rows, ["gap", "p", "n"], numeric_format=[None, "{:.2f}", "{:.1e}"])
    assert [r[1] for r in cells] == ["0.50", "0.25"]
    assert [r[2] for r in cells] == ["3.0e+00", "4.0e+00"]  # a per-column format applies to ints
    cells, _ = format_columns(rows, ["gap", "p", "n"], numeric_format="{:.3f}")
    assert [r[0] for r in cells] == ["0.000", "0.300"] and [r[2] for r in cells] == ["3", "4"]


def test_numpy_and_torch_scalars_are_numbers_and_none_is_a_dash():
    rows = [[np.float32(0.5), np.int64(7), torch.tensor(2.25)], [None, 8, 1.0]]
    cells, numeric = format_columns(rows, ["a", "b", "c"])
    assert numeric == [True, True, True]
    assert cells == [["0.5000", "7", "2.250"], ["—", "8", "1.000"]]


def test_mixed_columns_are_left_aligned_and_format_each_number_alone():
    rows = [["lr", 0.001], ["steps", 200], ["loss", 2.3456], ["model", "SmolLM2"]]
    cells, numeric = format_columns(rows, ["setting", "value"])
    assert numeric == [False, False]
    assert [r[1] for r in cells] == ["0.001000", "200", "2.346", "SmolLM2"]
    cells, numeric = format_columns(rows[:3], ["setting", "value"])  # all numbers: one format
    assert numeric == [False, True] and [r[1] for r in cells] == ["0.0010", "200", "2.3456"]


def test_repeated_column_names_are_allowed():
    html = table_html([[1, 0.5, 2, 0.25]], ["φ", "chance", "φ", "chance"])
    assert [th.text for th in _table(html).iter("th")] == ["φ", "chance", "φ", "chance"]


def test_bad_input_names_the_problem():
    with pytest.raises(ValueError, match="row 1 has 2 cells but there are 3 columns"):
        format_columns([[1, 2, 3], [1, 2]], ["a", "b", "c"])
    with pytest.raises(ValueError, match="no such column"):
        format_columns([[1.0]], ["a"], numeric_format={"b": "{:.2f}"})
    with pytest.raises(ValueError, match="one format \\(or None\\) per column"):
        format_columns([[1.0, 2.0]], ["a", "b"], numeric_format=["{:.2f}"])
    with pytest.raises(TypeError, match="numeric_format must be"):
        format_columns([[1.0]], ["a"], numeric_format=3)
    with pytest.raises(ValueError, match="is not a format"):
        format_columns([[1.0]], ["a"], numeric_format="{:.2q}")
    with pytest.raises(TypeError, match="not one string"):
        format_columns([[1.0]], "a")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(min_value=-1e9, max_value=1e9, allow_nan=False, allow_infinity=False),
                min_size=1, max_size=12),
       st.integers(min_value=1, max_value=6))
def test_a_float_column_shares_one_notation_and_precision(values, sig):
    cells, numeric = format_columns([[v] for v in values], ["x"],
                                    numeric_format=f"{{:,.{sig}g}}")
    assert numeric == [True]
    shapes = {_decimals(r[0]) for r in cells}
    assert len(shapes) == 1, f"mixed formats in one column: {[r[0] for r in cells]}"
    (notation, decimals), = shapes
    for v, (cell,) in zip(values, cells):
        shown = float(cell.replace(",", ""))
        if notation == "f":
            assert abs(shown - v) <= 0.5 * 10 ** -decimals * (1 + 1e-9) + 1e-9 * abs(v)
        else:
            assert abs(shown - v) <= 0.5 * 10 ** -decimals * 10 ** (
                int(cell.split("e")[1])) * (1 + 1e-9)
    # the largest number keeps the significant digits asked for
    big = max(values, key=abs)
    if big != 0 and notation == "f":
        assert decimals >= sig - 1 - int(np.floor(np.log10(abs(big))))


def test_show_table_prints_rich_text_in_a_terminal(capsys, monkeypatch):
    monkeypatch.setattr(report, "_in_notebook", lambda: False)
    show_table(ROWS, COLUMNS, title="t")
    out = capsys.readouterr().out
    assert "┃" in out and "1.787" in out and "<table" not in out


def test_show_table_displays_html_in_a_notebook(monkeypatch):
    shown = []
    import IPython.display

    monkeypatch.setattr(report, "_in_notebook", lambda: True)
    monkeypatch.setattr(IPython.display, "display",
                        lambda obj, raw=False: shown.append((obj, raw)))
    assert show_table(ROWS, COLUMNS, title="Shapes") is None
    (bundle, raw), = shown
    assert raw and "<table" in bundle["text/html"] and "<caption>Shapes</caption>" in \
        bundle["text/html"]
    assert "1.787" in bundle["text/plain"]  # a text copy for viewers without HTML


def test_glue_returns_its_value():
    assert glue("answer", 42) == 42


def test_glue_stores_numpy_scalars_as_python_numbers(monkeypatch):
    """numpy 2's repr np.float64(..) would render empty under a :.1f glue role."""
    import myst_nb
    stored = {}
    monkeypatch.setattr(myst_nb, "glue", lambda name, value, display=False:
                        stored.__setitem__(name, value))
    assert glue("x", np.float64(2.5)) == 2.5 and type(stored["x"]) is float
    glue("n", np.int64(3))
    assert type(stored["n"]) is int and f"{stored['x']:.1f}" == "2.5"
    glue("t", torch.tensor(1.5))
    assert type(stored["t"]) is float
    glue("s", "text")
    assert stored["s"] == "text"


def test_a_column_of_formatted_numbers_is_right_aligned_as_written():
    """Pre-formatted numbers (an interval, a signed difference, a ratio, a percentage, the
    missing mark) keep their text but align like numbers; words, or counts written as
    phrases, stay text."""
    rows = [["full", "45.3 [42.8, 47.8]", "+0.010", "1×", "yes"],
            ["r=8", "41.9 [34.7, 49.2]", "\u22120.549", "10×", "no"],
            ["r=64", "—", "12 %", "3.33×", "1 of 16"]]
    cells, numeric = format_columns(rows, ["method", "EM", "gap", "ratio", "edge?"])
    assert numeric == [False, True, True, True, False]
    assert cells[1][2] == "\u22120.549" and cells[2][1] == "—"
    html = table_html(rows, ["method", "EM", "gap", "ratio", "edge?"])
    assert 'class="data row1 col1 num"' in html and 'class="data row2 col4 text"' in html
    # a number with one more in brackets (a choice and its runner-up) aligns too; a word
    # in brackets does not
    cells, numeric = format_columns([["a", "0.5 (0.35)", "0.5 (best)"],
                                     ["b", "1.4 (1)", "1 (tie)"]], ["m", "λ", "note"])
    assert numeric == [False, True, False]
