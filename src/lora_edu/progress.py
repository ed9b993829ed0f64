"""Progress bars that look right everywhere the book is read.

A live bar is what a student wants in Colab or a terminal. A built web page is different:
it only shows what the cell printed, so a live widget (or a text bar redrawn with ``\\r``)
leaves an empty box, a warning, or a screen of half-drawn bars. :func:`progress` therefore
picks its display from the environment:

* ``LORA_EDU_PROGRESS=static`` (the book build sets it): no live display; one summary
  line is printed when the loop ends, e.g. ``pretrain: 200/200 steps in 41.2 s (4.9 it/s)
  · loss=1.83``.
* ``LORA_EDU_PROGRESS=off``: nothing is printed.
* otherwise (``auto``): ``tqdm``'s notebook widget when running in Jupyter/Colab with
  ``ipywidgets`` installed, and a text bar in a terminal or when ``ipywidgets`` is missing.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, Generic, TypeVar

__all__ = ["progress", "progress_mode"]

T = TypeVar("T")
_MODES = ("auto", "static", "off")


def progress_mode() -> str:
    """The display mode from ``LORA_EDU_PROGRESS`` (``auto`` when unset)."""
    mode = os.environ.get("LORA_EDU_PROGRESS", "auto").strip().lower() or "auto"
    if mode not in _MODES:
        raise ValueError(f"LORA_EDU_PROGRESS must be one of {_MODES}, got {mode!r}")
    return mode


def _in_notebook() -> bool:
    shell = sys.modules.get("IPython")
    if shell is None:
        return False
    ip = shell.get_ipython()  # type: ignore[attr-defined]
    return ip is not None and type(ip).__name__ in {"ZMQInteractiveShell", "Shell"}


class _StaticBar(Generic[T]):
    """Iterates silently and prints one summary line at the end (or on ``close``)."""

    def __init__(self, iterable: Iterable[T], total: int | None, desc: str, unit: str,
                 quiet: bool) -> None:
        self._iterable = iterable
        self.total = total
        self.desc = desc
        self.unit = unit
        self.quiet = quiet
        self.n = 0
        self._postfix: dict[str, Any] = {}
        self._start = time.perf_counter()
        self._closed = False

    def __iter__(self) -> Iterator[T]:
        try:
            for item in self._iterable:
                yield item
                self.n += 1
        finally:
            self.close()

    def set_postfix(self, ordered_dict: dict[str, Any] | None = None, refresh: bool = True,
                    **kwargs: Any) -> None:
        self._postfix = {**(ordered_dict or {}), **kwargs}

    def update(self, n: int = 1) -> None:
        self.n += n

    def close(self) -> None:
        if self._closed or self.quiet:
            self._closed = True
            return
        self._closed = True
        elapsed = time.perf_counter() - self._start
        rate = self.n / elapsed if elapsed > 0 else float("inf")
        total = f"/{self.total}" if self.total is not None else ""
        extra = "".join(f" · {k}={_fmt(v)}" for k, v in self._postfix.items())
        print(f"{self.desc}: {self.n}{total} {self.unit} in {elapsed:.1f} s "
              f"({rate:.1f} {self.unit}/s){extra}", flush=True)


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def progress(iterable: Iterable[T], total: int | None = None, desc: str = "",
             unit: str = "it") -> Any:
    """Wrap ``iterable`` in the progress display that suits this environment.

    The returned object iterates like ``iterable`` and supports tqdm's
    ``set_postfix(...)``, ``update(n)`` and ``close()`` in every mode.
    """
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    mode = progress_mode()
    if mode in ("static", "off"):
        return _StaticBar(iterable, total, desc, unit, quiet=(mode == "off"))
    if _in_notebook() and importlib.util.find_spec("ipywidgets") is not None:
        from tqdm.notebook import tqdm as notebook_tqdm
        return notebook_tqdm(iterable, total=total, desc=desc, unit=unit)
    from tqdm import tqdm
    return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stdout,
                dynamic_ncols=True)
