"""Putting computed numbers and tables on the page.

The book never types a number that code produced: it prints it, tables it, or *glues* it
into the prose with MyST-NB's ``{glue:text}`` role. :func:`glue` wraps ``myst_nb.glue`` so
that the same chapter runs in Colab, where MyST-NB is not installed (there the value is
simply displayed when asked to be).

Tables go through :func:`show_table`. In a notebook (the built pages, Jupyter, Colab) it
displays a real HTML ``<table>`` made by pandas' :class:`~pandas.io.formats.style.Styler`: a
caption, right-aligned numbers in tabular figures, and **one format per column**, so that a
column's numbers line up digit by digit (never 1.67 beside 1.787 beside 0.2389). In a terminal
it prints the same cells as a rich table.

How a column of floats is formatted (``numeric_format``):

* a fixed format such as ``"{:.3f}"``, ``"{:.2e}"`` or ``"{:.1%}"`` is used as given;
* a significant-digits format ``"{:.Ng}"`` (the default is ``"{:,.4g}"``) means "N significant
  digits, one precision for the whole column": the number of decimals is chosen from the
  column's values so that its largest number shows N significant digits and its smallest
  non-zero number at least two; when that would take more than six decimals (or the numbers
  reach 10¹²), the column is written in scientific notation with N − 1 decimals;
* integers are counts and are printed exactly (``4,718,592``).

``numeric_format`` is one format for every column, or a sequence with one entry per column,
or a mapping from column name to format (``None`` entries and missing names take the default).
A column that also holds text (a "setting / value" table) is left-aligned and each of its
numbers is formatted on its own. A column of strings that are *already formatted numbers*
(``"45.3 [42.8, 47.8]"``, ``"+0.010"``, ``"3.33×"``, ``"12 %"``, ``"0.286 (0.031–0.644)"``,
``"—"``) is kept as written but right-aligned like a numeric one.
"""

from __future__ import annotations

import hashlib
import html
import math
import numbers
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

__all__ = ["glue", "make_table", "show_table", "make_styler", "table_html", "format_columns"]

DEFAULT_FORMAT = "{:,.4g}"
MISSING = "—"
_SPEC = re.compile(r"^\{:(?P<comma>[,_]?)(?:\.(?P<prec>\d+))?(?P<type>[gGn]?)\}$|^\{\}$")


def glue(name: str, value: Any, display: bool = False) -> Any:
    """Store ``value`` under ``name`` for ``{glue:text}`name:format``` roles in the prose.

    Returns ``value`` so that a cell can glue and use a number in one line. A numpy scalar
    or 0-d array/tensor is stored as the Python number it holds: numpy 2 writes
    ``np.float64(0.5)`` as its repr, which a ``{glue:text}`name:.1f``` role cannot format.
    """
    value = _scalar(value)
    try:
        from myst_nb import glue as _glue
    except ImportError:  # Colab, a plain Jupyter or a script: nothing to glue into
        if display:
            print(f"{name} = {value}")
        return value
    _glue(name, value, display=display)
    return value


# ---------------------------------------------------------------------------------- cells
def _scalar(v: Any) -> Any:
    """numpy scalars and 0-d arrays or tensors as the Python number they hold."""
    if not isinstance(v, (str, bytes)) and getattr(v, "ndim", None) == 0 and hasattr(v, "item"):
        return v.item()
    return v


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_float(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, numbers.Integral))


def _is_number(v: Any) -> bool:
    return _is_int(v) or _is_float(v)


_NUM = r"[+\-\u2212]?(?:\d[\d,]*(?:\.\d+)?|\.\d+)(?:e[+\-\u2212]?\d+)?(?:\s?(?:%|×))?"
_FORMATTED_NUMBER = re.compile(   # a number, then optionally an interval or one number in brackets
    rf"{_NUM}(?:\s*[\[(]\s*{_NUM}(?:\s*(?:,|–|-|to)\s*{_NUM})?\s*[\])])?", re.IGNORECASE)


def _is_formatted_number(v: Any) -> bool:
    """A string that is a number as written: ``"2.56"``, ``"+3.6"``, ``"45.3 [42.8, 47.8]"``,
    ``"0.5 (0.35)"``, ``"3.33×"``, ``"12 %"``, or the missing mark."""
    return isinstance(v, str) and (v.strip() == MISSING
                                   or _FORMATTED_NUMBER.fullmatch(v.strip()) is not None)


def _decimals_for(values: Sequence[float], sig: int) -> int | None:
    """Decimals that give the largest |value| ``sig`` significant digits and the smallest
    non-zero one at least two; ``None`` means "use scientific notation"."""
    finite = [abs(v) for v in values if math.isfinite(v) and v != 0]
    if not finite:
        return 0
    lo, hi = min(finite), max(finite)
    if hi >= 1e12:
        return None
    decimals = max(sig - 1 - math.floor(math.log10(hi)), 1 - math.floor(math.log10(lo)), 0)
    return None if decimals > 6 else decimals


def _float_formatter(spec: str, values: Sequence[float]) -> Callable[[float], str]:
    """One formatter for a whole column of floats (see the module docstring)."""
    m = _SPEC.match(spec)
    if m is None:  # a fixed format: the caller chose the precision
        try:
            spec.format(1.5)
        except (ValueError, IndexError, KeyError) as exc:
            raise ValueError(f"numeric_format {spec!r} is not a format for one number "
                             "(use e.g. '{:.3f}', '{:.2e}' or '{:,.4g}')") from exc
        return spec.format
    sig = int(m.group("prec")) if m.group("prec") else 4
    sig = max(sig, 1)
    comma = m.group("comma") or ""
    decimals = _decimals_for(values, sig)
    if decimals is None:
        return f"{{:.{max(sig - 1, 0)}e}}".format
    return f"{{:{comma}.{decimals}f}}".format


def _cell_spec(numeric_format: Any, columns: Sequence[str]) -> list[str]:
    """The format of each column, from one format, a sequence or a mapping."""
    n = len(columns)
    if numeric_format is None:
        return [DEFAULT_FORMAT] * n
    if isinstance(numeric_format, str):
        return [numeric_format] * n
    if isinstance(numeric_format, Mapping):
        unknown = set(numeric_format) - set(columns)
        if unknown:
            raise ValueError(f"numeric_format names no such column(s): {sorted(unknown)}; "
                             f"the columns are {list(columns)}")
        return [numeric_format.get(c) or DEFAULT_FORMAT for c in columns]
    if isinstance(numeric_format, Sequence):
        if len(numeric_format) != n:
            raise ValueError(f"numeric_format has {len(numeric_format)} entries for {n} "
                             "columns: give one format (or None) per column")
        return [f or DEFAULT_FORMAT for f in numeric_format]
    raise TypeError("numeric_format must be a format string such as '{:.3f}', a sequence of "
                    f"them (one per column) or a mapping column -> format, not "
                    f"{type(numeric_format).__name__}")


def _check(rows: Sequence[Sequence[Any]], columns: Sequence[str]) -> list[list[Any]]:
    if isinstance(columns, str):
        raise TypeError("columns must be a sequence of column names, not one string")
    out = []
    for i, row in enumerate(rows):
        if isinstance(row, (str, bytes)) or not isinstance(row, Sequence):
            raise TypeError(f"row {i} is a {type(row).__name__}; each row must be a list or "
                            "tuple of cells")
        if len(row) != len(columns):
            raise ValueError(f"row {i} has {len(row)} cells but there are {len(columns)} "
                             f"columns {list(columns)}: give every row one cell per column")
        out.append([_scalar(v) for v in row])
    return out


def format_columns(rows: Sequence[Sequence[Any]], columns: Sequence[str],
                   numeric_format: Any = DEFAULT_FORMAT) -> tuple[list[list[str]], list[bool]]:
    """The table's cells as text, and which columns are numeric (right-aligned).

    A column is numeric when every cell is a number (or ``None``, shown as "—"); its floats
    share one format (see the module docstring). Returns ``(cells, numeric)``, with
    ``cells[i][j]`` the text of row ``i``, column ``j``.
    """
    rows = _check(rows, columns)
    specs = _cell_spec(numeric_format, columns)
    per_column = numeric_format is not None and not isinstance(numeric_format, str)
    numeric: list[bool] = []
    columns_text: list[list[str]] = []
    for j, spec in enumerate(specs):
        values = [r[j] for r in rows]
        is_num = any(_is_number(v) for v in values) and \
            all(_is_number(v) or v is None for v in values)
        # pre-formatted numbers (intervals, signed differences, ratios) align like numbers
        formatted = not is_num and any(isinstance(v, str) and v.strip() != MISSING
                                       for v in values) and \
            all(v is None or _is_formatted_number(v) for v in values)
        numeric.append(is_num or formatted)
        column_fmt = _float_formatter(spec, [float(v) for v in values if _is_float(v)]) \
            if is_num else None
        # a fixed format given for this very column applies to its integers too
        ints_too = per_column and is_num and _SPEC.match(spec) is None
        text = []
        for v in values:
            if v is None:
                text.append(MISSING)
            elif _is_float(v) or (ints_too and _is_int(v)):
                fmt = column_fmt or _float_formatter(spec, [float(v)])
                text.append(fmt(v))
            elif _is_int(v):
                text.append(f"{v:,}")
            else:
                text.append(str(v))
        columns_text.append(text)
    cells = [[columns_text[j][i] for j in range(len(columns))] for i in range(len(rows))]
    return cells, numeric


# ---------------------------------------------------------------------------------- output
def make_table(rows: Sequence[Sequence[Any]], columns: Sequence[str], title: str | None = None,
               numeric_format: Any = DEFAULT_FORMAT) -> Table:
    """A rich :class:`~rich.table.Table` of the same cells as the HTML table.

    Numeric columns are right-aligned and share one format, so that figures line up digit by
    digit.
    """
    cells, numeric = format_columns(rows, columns, numeric_format)
    table = Table(title=title, header_style="bold")
    for name, is_num in zip(columns, numeric):
        table.add_column(str(name), justify="right" if is_num else "left")
    for row in cells:
        table.add_row(*row)
    return table


def make_styler(rows: Sequence[Sequence[Any]], columns: Sequence[str], title: str | None = None,
                numeric_format: Any = DEFAULT_FORMAT):
    """The table as a pandas :class:`~pandas.io.formats.style.Styler`.

    The Styler shows the cells as :func:`format_columns` formats them, HTML-escaped (σ, ‖,
    <, & are safe), with the title as ``<caption>``, no index, and numeric columns
    right-aligned in tabular figures (cells of class ``num``).
    """
    import pandas as pd

    cells, numeric = format_columns(rows, columns, numeric_format)
    n = len(columns)
    # The frame holds the display text (so every path shows the same cells), with positional
    # column labels: chapter tables may repeat a header ("chance" twice), which Styler refuses.
    frame = pd.DataFrame(cells, columns=range(n), dtype=object) if cells else \
        pd.DataFrame(columns=range(n), dtype=object)
    digest = hashlib.sha1(repr((title, list(columns), cells)).encode()).hexdigest()[:10]
    styler = frame.style.set_uuid(f"lora{digest}").hide(axis="index")
    styler = styler.format(escape="html")
    styler = styler.format_index(lambda j: html.escape(str(columns[j])), axis=1)
    classes = pd.DataFrame([["num" if numeric[j] else "text" for j in range(n)]
                            for _ in range(len(cells))], index=frame.index, columns=frame.columns)
    if len(cells):
        styler = styler.set_td_classes(classes)
    styles = [{"selector": "caption",
               "props": "caption-side: top; text-align: left; font-weight: 600; "
                        "padding: 0 0 0.3em 0;"},
              {"selector": "th", "props": "text-align: left; padding: 0.2em 0.6em;"},
              {"selector": "td", "props": "padding: 0.2em 0.6em; vertical-align: top;"}]
    for j in range(n):
        if numeric[j]:
            styles.append({"selector": f"th.col{j}", "props": "text-align: right;"})
            styles.append({"selector": f"td.col{j}",
                           "props": "text-align: right; font-variant-numeric: tabular-nums; "
                                    "white-space: nowrap;"})
    styler = styler.set_table_styles(styles).set_table_attributes(
        'class="dataframe lora-table"')
    if title:
        styler = styler.set_caption(html.escape(str(title)))
    return styler


def table_html(rows: Sequence[Sequence[Any]], columns: Sequence[str], title: str | None = None,
               numeric_format: Any = DEFAULT_FORMAT) -> str:
    """The table as an HTML fragment: a ``<style>`` block for it and the ``<table>``."""
    return make_styler(rows, columns, title=title, numeric_format=numeric_format).to_html()


def _in_notebook() -> bool:
    """True in a Jupyter kernel (the book's build, Jupyter, Colab); False in a terminal."""
    return Console().is_jupyter


def show_table(rows: Sequence[Sequence[Any]], columns: Sequence[str], title: str | None = None,
               numeric_format: Any = DEFAULT_FORMAT) -> None:
    """Show a table: an HTML ``<table>`` in a notebook or on the book's pages, a rich table in
    a terminal.

    Returns nothing, so that a call ending a notebook cell does not display the table twice;
    use :func:`make_table` (rich) or :func:`make_styler` (pandas) to keep the table object.
    """
    table = make_table(rows, columns, title=title, numeric_format=numeric_format)
    if not _in_notebook():
        Console().print(table)
        return
    from IPython.display import display

    plain = Console(width=88, record=True, file=_Null(), color_system=None,
                    force_jupyter=False)
    plain.print(table)
    display({"text/html": table_html(rows, columns, title=title,
                                     numeric_format=numeric_format),
             "text/plain": plain.export_text()}, raw=True)


class _Null:
    """A file that swallows what is written (the plain-text copy is only recorded)."""

    def write(self, _s: str) -> int:
        return 0

    def flush(self) -> None:
        pass
