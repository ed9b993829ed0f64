"""Putting computed numbers and tables on the page.

The book never types a number that code produced: it prints it, tables it, or *glues* it
into the prose with MyST-NB's ``{glue:text}`` role. :func:`glue` wraps ``myst_nb.glue`` so
that the same chapter runs in Colab, where MyST-NB is not installed (there the value is
simply displayed when asked to be).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

__all__ = ["glue", "make_table", "show_table"]


def glue(name: str, value: Any, display: bool = False) -> Any:
    """Store ``value`` under ``name`` for ``{glue:text}`name:format``` roles in the prose.

    Returns ``value`` so that a cell can glue and use a number in one line.
    """
    try:
        from myst_nb import glue as _glue
    except ImportError:  # Colab, a plain Jupyter or a script: nothing to glue into
        if display:
            print(f"{name} = {value}")
        return value
    _glue(name, value, display=display)
    return value


def make_table(rows: Sequence[Sequence[Any]], columns: Sequence[str], title: str | None = None,
               numeric_format: str = "{:,.4g}") -> Table:
    """A rich :class:`~rich.table.Table`; floats are formatted with ``numeric_format``.

    Numeric columns are right-aligned so that figures line up digit by digit.
    """
    table = Table(title=title, header_style="bold")
    numeric = [all(isinstance(r[i], (int, float)) for r in rows) for i in range(len(columns))]
    for name, is_num in zip(columns, numeric):
        table.add_column(name, justify="right" if is_num else "left")
    for row in rows:
        cells = [numeric_format.format(v) if isinstance(v, float) else
                 (f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v))
                 for v in row]
        table.add_row(*cells)
    return table


def show_table(rows: Sequence[Sequence[Any]], columns: Sequence[str], title: str | None = None,
               numeric_format: str = "{:,.4g}") -> None:
    """Print a table: HTML in a notebook or on the book's pages, text in a terminal.

    Returns nothing, so that a call ending a notebook cell does not display the table twice;
    use :func:`make_table` to keep the table object.
    """
    Console().print(make_table(rows, columns, title=title, numeric_format=numeric_format))
