"""lora_edu.plots.slider: a static-site slider with alt text, a caption and no CDN."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
from matplotlib import animation  # noqa: E402

from lora_edu.plots import slider  # noqa: E402


def _animation():
    fig, ax = plt.subplots(figsize=(2, 2), dpi=40)
    line, = ax.plot([0, 1], [0, 0])
    anim = animation.FuncAnimation(fig, lambda i: line.set_ydata([0, i]) or [line], frames=3)
    return anim, fig


def test_slider_has_alt_text_a_caption_and_no_icon_font():
    anim, fig = _animation()
    html = slider(anim, fig, alt='a line "rising"', caption="frames & steps").data
    assert '<img alt="a line &quot;rising&quot;"' in html
    assert "<figcaption>frames &amp; steps</figcaption>" in html
    assert "font-awesome" not in html and 'class="fa ' not in html
    assert 'aria-label="frame"' in html and html.count("data:image/png;base64") == 3


def test_slider_refuses_missing_alt_text():
    anim, fig = _animation()
    with pytest.raises(ValueError, match="alt text"):
        slider(anim, fig, alt="", caption="x")
