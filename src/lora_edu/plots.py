"""Figure helpers shared by the chapters.

:func:`slider` turns a matplotlib animation into a figure a reader can scrub through on the
static site, with no running Python and no internet: matplotlib renders every frame when the
page is built and ``FuncAnimation.to_jshtml`` embeds them with a few lines of JavaScript. The
helper adds what the raw output lacks: alt text, a caption, an accessible name for the slider,
a width that fits a phone, and text buttons instead of an icon font that would come from a CDN.
"""

from __future__ import annotations

import html as html_lib
import re
from typing import Any

__all__ = ["slider"]

#: to_jshtml's Font Awesome icons, replaced by characters every font has.
_GLYPHS = {"fa fa-minus": "−", "fa fa-plus": "+", "fa fa-fast-backward": "⇤",
           "fa fa-step-backward": "‹", "fa fa-play fa-flip-horizontal": "◀",
           "fa fa-pause": "‖", "fa fa-play": "▶", "fa fa-step-forward": "›",
           "fa fa-fast-forward": "⇥"}


def slider(anim: Any, fig: Any, alt: str, caption: str) -> Any:
    """``anim`` (a ``matplotlib.animation.FuncAnimation`` on ``fig``) as a self-contained
    HTML slider with alt text and a caption; closes ``fig`` so it is not shown twice.

    Returns:
        An ``IPython.display.HTML`` object (the last expression of a cell displays it).
    """
    import matplotlib.pyplot as plt
    from IPython.display import HTML

    if not alt or not caption:
        raise ValueError("slider needs alt text and a caption: say what the frames show")
    page = anim.to_jshtml(default_mode="once")
    plt.close(fig)
    page = re.sub(r'<link rel="stylesheet"[^>]*font-awesome[^>]*>', "", page)
    for icon, glyph in _GLYPHS.items():
        page = page.replace(f'<i class="{icon}"></i>', glyph)
    alt_attr = html_lib.escape(alt, quote=True)
    page = page.replace('<img id="', f'<img alt="{alt_attr}" id="', 1)
    page = page.replace('<input id="_anim_slider', '<input aria-label="frame" id="_anim_slider', 1)
    page = page.replace("width: 374px;", "width: 100%; max-width: 374px;")
    return HTML(f'<figure role="group" aria-label="{alt_attr}">{page}'
                f'<figcaption>{html_lib.escape(caption)}</figcaption></figure>')
