"""Draw the book's diagrams as hand-written SVG into ``book/images/``.

Run ``python scripts/make_diagrams.py`` (or ``--check`` to fail when a committed file is stale).
Each diagram is plain SVG with real ``<text>`` (searchable, readable by screen readers, crisp at
any zoom), a ``<title>`` and ``<desc>`` for assistive technology, and no external fonts or
images. Colours are the Okabe–Ito palette (distinguishable with the common colour-vision
deficiencies) as light fills with dark outlines and dark text on a white card, so a diagram
reads the same on the light theme and on the dark theme (which shows images on white).

The notation is the paper's: ``W0 ∈ R^{d×k}``, ``B ∈ R^{d×r}``, ``A ∈ R^{r×k}``,
``h = W0 x + (α/r)·B A x``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

OUT = Path(__file__).resolve().parents[1] / "book" / "images"

INK = "#1b1f24"  # text and outlines
MUTED = "#57606a"  # secondary text
FROZEN = ("#e3e8ee", "#4a5d73")  # fill, stroke: the frozen base
A_COL = ("#fbe2c4", "#b35806")  # orange: A
B_COL = ("#cfeadf", "#00795a")  # bluish green: B
S_COL = ("#e6dcf0", "#6a3d9a")  # purple: the scale / merged
Q_COL = ("#d5e6f5", "#0b5394")  # blue: quantised storage
ADAPTER = [("#cfe3f3", "#0072b2"), ("#fde7b0", "#b07d00"), ("#cdeee3", "#00795a")]

FONT = "system-ui, -apple-system, 'Segoe UI', Roboto, 'Helvetica Neue', Arial, sans-serif"
STYLE = f"""
text {{ font-family: {FONT}; fill: {INK}; }}
.t {{ font-size: 16px; }}
.b {{ font-size: 17px; font-weight: 600; }}
.big {{ font-size: 22px; font-weight: 600; font-style: italic;
       font-family: 'STIX Two Text', 'Cambria Math', 'Times New Roman', serif; }}
.s {{ font-size: 13.5px; fill: {MUTED}; }}
.h {{ font-size: 18px; font-weight: 700; }}
.math {{ font-family: 'STIX Two Text', 'Cambria Math', 'Times New Roman', serif;
        font-style: italic; font-size: 18px; }}
"""


def _attrs(**kw) -> str:
    return " ".join(f"{k.rstrip('_').replace('_', '-')}={quoteattr(str(v))}" for k, v in kw.items())


def text(x, y, s, cls="t", anchor="middle", **kw) -> str:
    """A ``<text>`` element; ``s`` is escaped, and ``^{...}``/``_{...}`` become raised/lowered
    tspans (for ℝ^{d×k} and the like)."""
    out, i = [], 0
    while i < len(s):
        if s[i] in "^_" and i + 1 < len(s) and s[i + 1] == "{":
            j = s.index("}", i)
            dy = "-0.45em" if s[i] == "^" else "0.3em"
            back = "0.45em" if s[i] == "^" else "-0.3em"
            out.append(f'<tspan dy="{dy}" font-size="72%">{escape(s[i + 2:j])}</tspan>'
                       f'<tspan dy="{back}">\u200b</tspan>')
            i = j + 1
        else:
            j = i
            while j < len(s) and not (s[j] in "^_" and j + 1 < len(s) and s[j + 1] == "{"):
                j += 1
            out.append(escape(s[i:j]))
            i = j
    return f'<text {_attrs(x=x, y=y, class_=cls, text_anchor=anchor, **kw)}>{"".join(out)}</text>'


def rect(x, y, w, h, col, rx=6, dash=False, sw=1.6) -> str:
    extra = ' stroke-dasharray="5 4"' if dash else ""
    return (f'<rect {_attrs(x=x, y=y, width=w, height=h, rx=rx, fill=col[0], stroke=col[1])}'
            f' stroke-width="{sw}"{extra}/>')


def poly(points, col, sw=1.6) -> str:
    pts = " ".join(f"{x},{y}" for x, y in points)
    return f'<polygon points="{pts}" fill="{col[0]}" stroke="{col[1]}" stroke-width="{sw}"/>'


def line(points, arrow=True, color=INK, sw=1.6, dash=False) -> str:
    pts = " ".join(f"{x},{y}" for x, y in points)
    head = ' marker-end="url(#arrow)"' if arrow else ""
    extra = ' stroke-dasharray="5 4"' if dash else ""
    return (f'<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="{sw}"'
            f' stroke-linejoin="round"{head}{extra}/>')


def path(d, arrow=True, color=INK, sw=1.6, dash=False) -> str:
    head = ' marker-end="url(#arrow)"' if arrow else ""
    extra = ' stroke-dasharray="5 4"' if dash else ""
    return f'<path d="{d}" fill="none" stroke="{color}" stroke-width="{sw}"{head}{extra}/>'


def circle(x, y, r, col=("#ffffff", INK), label=None, cls="b") -> str:
    out = f'<circle {_attrs(cx=x, cy=y, r=r, fill=col[0], stroke=col[1])} stroke-width="1.6"/>'
    if label:
        out += text(x, y + 6, label, cls)
    return out


def svg(name: str, w: int, h: int, title: str, desc: str, body: list[str]) -> str:
    return "\n".join([
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {w} {h}" width="{w}" '
        f'height="{h}" role="img" aria-labelledby="{name}-title {name}-desc">',
        f'<title id="{name}-title">{escape(title)}</title>',
        f'<desc id="{name}-desc">{escape(desc)}</desc>',
        f"<style>{STYLE}</style>",
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" '
        f'markerHeight="7" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" '
        f'fill="{INK}"/></marker></defs>',
        f'<rect x="0" y="0" width="{w}" height="{h}" rx="10" fill="#ffffff"/>',
        *body,
        "</svg>",
        "",
    ])


# --------------------------------------------------------------------------------------------
def lora_layer() -> str:
    b = []
    # input vector x ∈ R^k
    b += [rect(24, 118, 22, 120, ("#ffffff", INK), rx=3), text(35, 108, "x", "big"),
          text(35, 258, "ℝ^{k}", "s")]
    b += [line([(46, 178), (78, 178)], arrow=False), line([(78, 178), (78, 88), (128, 88)]),
          line([(78, 178), (78, 270), (128, 270)])]
    # frozen W0 (d×k)
    b += [rect(130, 30, 170, 116, FROZEN), text(215, 78, "W_{0}", "big"),
          text(215, 103, "d × k", "t"), text(215, 128, "frozen: no gradient", "s")]
    # A: r×k (wide input side k, narrow output side r)
    b += [poly([(130, 212), (210, 254), (210, 286), (130, 328)], A_COL),
          text(160, 276, "A", "big"), text(170, 350, "A: r × k", "t"),
          text(170, 370, "random at init", "s")]
    b += [line([(210, 270), (246, 270)]), text(228, 262, "r", "s")]
    # B: d×r (narrow input side r, wide output side d)
    b += [poly([(248, 254), (328, 222), (328, 318), (248, 286)], B_COL),
          text(300, 276, "B", "big"), text(290, 350, "B: d × r", "t"),
          text(290, 370, "zero at init", "s")]
    # scale s = α/r
    b += [line([(328, 270), (368, 270)]), circle(392, 270, 22, S_COL, "× s"),
          text(392, 314, "s = α / r", "t")]
    # the sum
    b += [line([(300, 88), (470, 88), (470, 156)]), line([(414, 270), (470, 270), (470, 200)]),
          circle(470, 178, 20, label="+", cls="h")]
    b += [line([(490, 178), (530, 178)]), rect(532, 128, 22, 100, ("#ffffff", INK), rx=3),
          text(543, 118, "h", "big"), text(543, 248, "ℝ^{d}", "s")]
    b += [text(380, 60, "W_{0} x", "math"), text(462, 234, "s·B A x", "math", anchor="end")]
    # equation and legend
    b += [text(24, 412, "h = W_{0} x + (α / r) · B A x", "math", anchor="start"),
          text(24, 438, "Trainable: r(d + k) numbers (A and B) instead of d·k;", "s",
               anchor="start"),
          text(24, 458, "B = 0 at init makes B A = 0, so training starts from the pretrained "
               "model.", "s", anchor="start")]
    b += [rect(420, 330, 16, 14, FROZEN, rx=2), text(442, 342, "frozen", "s", anchor="start"),
          rect(420, 352, 16, 14, A_COL, rx=2), rect(438, 352, 16, 14, B_COL, rx=2),
          text(460, 364, "trained", "s", anchor="start")]
    return svg("lora-layer", 580, 476, "The LoRA layer",
               "The input x, a vector of length k, goes two ways. Upper path: through the "
               "frozen pretrained weight W0 of shape d by k. Lower path: through A, of shape r "
               "by k, which narrows x to r numbers, then B, of shape d by r, which widens them "
               "back to d, then a multiplication by the scale s = alpha over r. The two paths "
               "are added to give h = W0 x + s B A x, a vector of length d. A starts random "
               "and B starts at zero, so at initialisation the layer computes exactly W0 x. "
               "Only A and B are trained.", b)


def merging() -> str:
    b = []
    y0 = 40
    b += [rect(20, y0, 110, 110, FROZEN), text(75, y0 + 62, "W_{0}", "big"),
          text(75, y0 + 132, "d × k", "s")]
    b += [text(150, y0 + 62, "+", "h"), text(180, y0 + 62, "s ·", "math")]
    b += [rect(206, y0, 28, 110, B_COL, rx=3), text(220, y0 + 62, "B", "b"),
          text(220, y0 + 132, "d × r", "s")]
    b += [rect(244, y0 + 41, 110, 28, A_COL, rx=3), text(299, y0 + 61, "A", "b"),
          text(299, y0 + 92, "r × k", "s")]
    b += [line([(372, y0 + 55), (432, y0 + 55)], sw=2), text(402, y0 + 42, "merge", "b")]
    b += [rect(446, y0, 110, 110, S_COL), text(501, y0 + 62, "W′", "big"),
          text(501, y0 + 132, "d × k", "s")]
    b += [path(f"M 501 {y0 + 142} C 501 {y0 + 190}, 75 {y0 + 190}, 75 {y0 + 146}", dash=True),
          text(288, y0 + 200, "unmerge: W_{0} = W′ − s·B A", "b"),
          text(288, y0 + 220, "(exact in exact arithmetic, up to rounding in floats)", "s")]
    b += [text(20, y0 + 258, "W′ = W_{0} + s·B A is one ordinary d × k matrix: h = W′x costs "
               "what W_{0} x cost,", "s", anchor="start"),
          text(20, y0 + 278, "with no extra latency. To switch tasks, unmerge one adapter "
               "and merge another.", "s", anchor="start")]
    return svg("merging", 576, 336, "Merging a LoRA adapter",
               "Merging: the frozen W0 (d by k) plus s times B (d by r) times A (r by k) is "
               "computed once into a single d by k matrix W-prime, so inference is one ordinary "
               "matrix multiplication with no extra latency. Unmerging subtracts s B A again to "
               "recover W0, exactly in exact arithmetic and up to rounding in floating point.",
               b)


def multi_adapter_batching() -> str:
    ids = [2, 0, 2, 1, 0, 2]
    b = []

    def adapters(x, y):
        out = []
        for a in range(3):
            out += [rect(x, y + 44 * a, 144, 34, ADAPTER[a]),
                    text(x + 72, y + 44 * a + 23, f"adapter {a}: A_{{{a}}}, B_{{{a}}}", "t")]
        return out

    def row(x, y, i, a, label=None):
        return [rect(x, y, 140, 26, ADAPTER[a], rx=3),
                text(x + 70, y + 18, label or f"row {i} · id {a}", "t")]

    # panel 1: gathered
    top = 30
    b += [text(20, top, "Gathered (BGMV): rows in arrival order", "h", anchor="start")]
    ry = top + 18
    for i, a in enumerate(ids):
        b += row(20, ry + 32 * i, i, a)
    ay = ry + 36
    for i, a in enumerate(ids):
        b += [line([(162, ry + 32 * i + 13), (394, ay + 44 * a + 17)], color=ADAPTER[a][1],
                   sw=1.4)]
    b += adapters(396, ay)
    b += [text(20, ry + 32 * 6 + 20, "One kernel for the batch: row i gathers B[id_{i}] and "
               "A[id_{i}] itself.", "s", anchor="start"),
          text(20, ry + 32 * 6 + 40, "Suits decoding, one token per row (Punica's BGMV).", "s",
               anchor="start")]
    # panel 2: segmented
    top2 = ry + 32 * 6 + 84
    b += [text(20, top2, "Segmented (SGMV): rows grouped by adapter", "h", anchor="start")]
    ry2 = top2 + 18
    order = sorted(range(len(ids)), key=lambda i: (ids[i], i))
    for pos, i in enumerate(order):
        b += row(20, ry2 + 32 * pos, i, ids[i])
    ay2 = ry2 + 36
    start = 0
    for a in range(3):
        n = sum(1 for i in ids if i == a)
        y1, y2 = ry2 + 32 * start + 2, ry2 + 32 * (start + n) - 8
        mid = (y1 + y2) / 2
        b += [path(f"M 166 {y1} C 176 {y1}, 172 {mid}, 182 {mid} C 172 {mid}, 176 {y2}, 166 {y2}",
                   arrow=False, color=ADAPTER[a][1], sw=1.6),
              line([(184, mid), (394, ay2 + 44 * a + 17)], color=ADAPTER[a][1], sw=2.2),
              text(284, (mid + ay2 + 44 * a + 17) / 2 - 8, f"{n} row{'s' if n > 1 else ''}", "s")]
        start += n
    b += adapters(396, ay2)
    b += [text(20, ry2 + 32 * 6 + 20, "Segment offsets [0, 2, 3, 6]. Per segment: shrink "
               "X_{seg} A^{⊤} to rank r,", "s", anchor="start"),
          text(20, ry2 + 32 * 6 + 40, "then expand by B^{⊤}: two thin products, never the "
               "d × k matrix B A.", "s", anchor="start"),
          text(20, ry2 + 32 * 6 + 60, "Suits prefill, many tokens per request (SGMV).", "s",
               anchor="start"),
          text(20, ry2 + 32 * 6 + 86, "In both, the shared base W_{0} x runs once for the "
               "whole batch.", "s", anchor="start")]
    return svg("multi-adapter", 560, ry2 + 32 * 6 + 104, "Many adapters in one batch",
               "A batch of six rows whose requests use adapters 2, 0, 2, 1, 0, 2. Gathered "
               "(BGMV): the rows stay in order and one kernel lets each row fetch its own "
               "adapter's B and A, so the lines from rows to adapters cross. Segmented (SGMV): "
               "the rows are sorted by adapter into contiguous segments (two rows of adapter 0, "
               "one of adapter 1, three of adapter 2), and each segment is multiplied first by "
               "its adapter's A transposed (shrink, down to rank r) and then by its B transposed "
               "(expand): two thin products, never the d by k matrix B A. In both, the shared "
               "base W0 x is computed once for the whole batch.", b)


def qlora_dataflow() -> str:
    b = []
    b += [text(20, 28, "Stored in 4 bits", "b", anchor="start")]
    b += [rect(20, 40, 180, 62, Q_COL), text(110, 64, "W_{0}: NF4 codes", "t"),
          text(110, 86, "4 bits per weight", "s")]
    b += [rect(20, 112, 180, 62, Q_COL, dash=True), text(110, 136, "absmax constants c", "t"),
          text(110, 158, "one per 64 weights, 8-bit", "s")]
    b += [line([(200, 71), (214, 71), (214, 100), (228, 100)]),
          line([(200, 143), (214, 143), (214, 112), (228, 112)])]
    b += [rect(230, 72, 136, 68, ("#ffffff", INK)), text(298, 98, "dequantise", "t"),
          text(298, 120, "codebook[q] · c", "s")]
    b += [line([(366, 106), (384, 106)])]
    b += [rect(386, 72, 120, 68, FROZEN), text(446, 98, "W_{0}", "big"),
          text(446, 124, "bf16, transient", "s")]
    b += [line([(506, 106), (540, 106), (540, 178)])]
    # x and the matmul
    b += [text(20, 236, "x (bf16)", "math", anchor="start"),
          line([(96, 230), (150, 230), (150, 200), (518, 200)]),
          circle(540, 200, 20, ("#ffffff", INK), "×", "h"),
          text(540, 240, "bf16 matmul", "s")]
    b += [line([(150, 230), (150, 300), (200, 300)])]
    # adapters
    b += [rect(202, 276, 96, 48, A_COL), text(250, 306, "A: r × k", "t"),
          line([(298, 300), (320, 300)]),
          rect(322, 276, 96, 48, B_COL), text(370, 306, "B: d × r", "t"),
          line([(418, 300), (440, 300)]), circle(462, 300, 20, S_COL, "× s"),
          line([(482, 300), (600, 300), (600, 222)])]
    b += [line([(560, 200), (578, 200)]), circle(600, 200, 20, label="+", cls="h"),
          line([(600, 180), (600, 150)]), text(600, 140, "h", "big")]
    b += [text(202, 348, "LoRA adapters beside the base: 16- or 32-bit, trained;", "s",
               anchor="start"),
          text(202, 366, "the only weights that receive gradients.", "s", anchor="start"),
          text(20, 400, "The base is stored as 4-bit codes and never trained; each layer "
               "dequantises it", "s", anchor="start"),
          text(20, 420, "to bf16 just for its matmul. Gradients flow through W_{0} to the "
               "input, never into it.", "s", anchor="start")]
    return svg("qlora", 640, 436, "QLoRA's data flow",
               "QLoRA stores the frozen base weight W0 as 4-bit NF4 codes plus one absmax "
               "constant per block of 64 weights (itself quantised to 8 bits: double "
               "quantisation). For each layer's forward and backward pass the codes are "
               "dequantised to a transient bf16 copy of W0, which multiplies the bf16 input x. "
               "Beside it, the LoRA adapters A (r by k) and B (d by r), kept in 16 or 32 bits, "
               "compute s B A x, which is added to the base output to give h. Only the "
               "adapters receive weight gradients.", b)


def ddp_vs_fsdp() -> str:
    b = []
    cols = [("#cfe3f3", "#0072b2"), ("#fde7b0", "#b07d00"), ("#cdeee3", "#00795a"),
            ("#f6d5e5", "#a8326e")]
    names = ["L1", "L2", "L3", "L4"]
    xs = (20, 300)

    def rank_box(x, y, r, half):
        out = [rect(x, y, 240, 132, ("#fafbfc", MUTED), rx=8),
               text(x + 12, y + 22, f"rank {r}", "b", anchor="start"),
               text(x + 228, y + 22, f"batch shard {r}", "s", anchor="end")]
        for j, label in enumerate(names):
            bx = x + 14 + 56 * j
            if half:  # the whole layer dashed, this rank's half filled
                out += [rect(bx, y + 40, 48, 34, ("#ffffff", cols[j][1]), rx=3, dash=True),
                        rect(bx + 24 * r, y + 40, 24, 34, cols[j], rx=3)]
            else:
                out += [rect(bx, y + 40, 48, 34, cols[j], rx=3)]
            out += [text(bx + 24, y + 62, label, "t")]
        return out

    b += [text(20, 28, "DDP: every rank holds the whole model", "h", anchor="start")]
    for r, x in enumerate(xs):
        b += rank_box(x, 42, r, half=False)
        b += [text(x + 14, 140, "full forward + backward,", "s", anchor="start"),
              text(x + 14, 158, "then the same optimizer step", "s", anchor="start")]
    b += [path("M 262 100 L 298 100"), path("M 298 116 L 262 116"),
          text(280, 198, "all-reduce of gradients (average) after backward", "t"),
          text(280, 220, "with LoRA only the adapters' gradients travel", "s")]
    y = 264
    b += [text(20, y, "FSDP: each rank holds 1/N of every layer", "h", anchor="start")]
    for r, x in enumerate(xs):
        b += rank_box(x, y + 14, r, half=True)
        b += [text(x + 14, y + 112, "its shards (filled) and", "s", anchor="start"),
              text(x + 14, y + 130, "their optimizer state only", "s", anchor="start")]
    b += [path(f"M 262 {y + 72} L 298 {y + 72}"), path(f"M 298 {y + 88} L 262 {y + 88}")]
    b += [text(20, y + 172, "1. all-gather a layer's shards just before it computes "
               "(forward and", "s", anchor="start"),
          text(36, y + 190, "backward), and free the gathered copy after", "s", anchor="start"),
          text(20, y + 212, "2. reduce-scatter of gradients: each rank gets the sum for "
               "its shard", "s", anchor="start"),
          text(20, y + 234, "3. each rank updates only its shard: memory per rank ≈ model / N",
               "s", anchor="start")]
    return svg("ddp-fsdp", 560, y + 252, "DDP versus FSDP",
               "Two ranks. DDP: each rank holds a full replica of all four layers and works on "
               "its own shard of the batch; after the backward pass the gradients are averaged "
               "across ranks with an all-reduce, and every rank takes the same optimizer step. "
               "With LoRA only the adapter gradients are communicated. FSDP: each rank holds "
               "only half of every layer's parameters and their optimizer state; before a "
               "layer computes, its shards are all-gathered into the full layer and freed "
               "afterwards; gradients are reduce-scattered so each rank receives the summed "
               "gradient of its own shard, and updates only that shard.", b)


def lora_targets() -> str:
    """Chapter 7: where W_q and W_v sit in a pre-norm transformer block."""
    b = []
    cx, w = 290, 150                      # the main column's centre and box width
    lora = ("#fff4e6", A_COL[1])          # an adapted projection: frozen W plus trained BA

    def box(y, label, sub=None, col=FROZEN, width=w, x=None):
        x = cx - width / 2 if x is None else x
        out = [rect(x, y, width, 38, col), text(x + width / 2, y + (17 if sub else 25), label,
                                                 "t")]
        if sub:
            out.append(text(x + width / 2, y + 32, sub, "s"))
        return out

    def adapted(x, y, name):
        return [rect(x, y, 112, 52, lora, sw=2.2), text(x + 56, y + 20, f"W_{{{name}}}", "math"),
                text(x + 56, y + 41, "+ s·B A", "t")]

    # the residual stream enters at the top
    b += [text(cx, 24, "x: the residual stream, T tokens × d_{model}", "t")]
    b += [line([(cx, 32), (cx, 52)]), *box(54, "LayerNorm (ln1)")]
    b += [line([(cx, 92), (cx, 106)]), line([(cx - 175, 106), (cx + 175, 106)], arrow=False)]
    qkv = {"q": cx - 231, "k": cx - 56, "v": cx + 119}
    for name, x in qkv.items():
        b += [line([(x + 56, 106), (x + 56, 120)])]
        b += (adapted(x, 122, name) if name in "qv"
              else [rect(x, 122, 112, 52, FROZEN), text(x + 56, 144, f"W_{{{name}}}", "math"),
                    text(x + 56, 165, "frozen", "s")])
        b += [line([(x + 56, 174), (x + 56, 196)])]
    b += [text(qkv["q"] + 56, 190, "queries", "s", anchor="end", dx=-8),
          text(qkv["v"] + 56, 190, "values", "s", anchor="start", dx=8)]
    b += [rect(cx - 231, 198, 462, 44, ("#ffffff", INK)),
          text(cx, 218, "attention, per head: softmax(q k^{⊤} / √d_{head} + mask) v", "t"),
          text(cx, 235, "no weights of its own", "s")]
    b += [line([(cx, 242), (cx, 256)]), *box(258, "W_{o}", "frozen")]
    # residual add 1
    b += [line([(cx, 296), (cx, 312)]), circle(cx, 330, 16, label="+", cls="h"),
          path(f"M {cx} 40 L {cx - 270} 40 L {cx - 270} 330 L {cx - 18} 330")]
    b += [line([(cx, 346), (cx, 360)]), *box(362, "LayerNorm (ln2)")]
    b += [line([(cx, 400), (cx, 414)]), *box(416, "fc1 → GELU → fc2", "MLP, frozen", width=200)]
    b += [line([(cx, 454), (cx, 470)]), circle(cx, 488, 16, label="+", cls="h"),
          path(f"M {cx} 353 L {cx + 150} 353 L {cx + 150} 488 L {cx + 18} 488", arrow=True)]
    b += [line([(cx, 504), (cx, 524)]), text(cx, 540, "to the next block", "s")]
    # legend and the three choices
    y = 572
    b += [rect(20, y - 12, 16, 14, FROZEN, rx=2), text(42, y, "frozen", "s", anchor="start"),
          rect(110, y - 12, 16, 14, lora, rx=2),
          text(132, y, "adapted: W stays frozen, B and A train", "s", anchor="start")]
    b += [text(20, y + 28, "The paper (and this chapter): W_{q} and W_{v} in every block.", "s",
               anchor="start"),
          text(20, y + 48, "PEFT's \"all-linear\": W_{q}, W_{k}, W_{v}, W_{o}, fc1 and fc2; "
               "on a transformers", "s", anchor="start"),
          text(20, y + 66, "PreTrainedModel it leaves out the output layer; on other models it does not.",
               "s", anchor="start")]
    return svg("lora-targets", 580, y + 82, "Where LoRA goes in a transformer block",
               "A pre-norm transformer block, top to bottom. The residual stream x goes through "
               "LayerNorm ln1 and then into three projections side by side: W_q, W_k and W_v. "
               "W_q and W_v are adapted with LoRA (the frozen weight plus a trained s times B A); "
               "W_k is frozen. Queries, keys and values meet in attention, softmax of q k "
               "transposed over the square root of the head size plus the causal mask, times v, "
               "which has no weights of its own. The output projection W_o is frozen. A "
               "residual connection adds the block's input back. Then LayerNorm ln2, the frozen "
               "MLP (fc1, GELU, fc2), and a second residual addition lead to the next block. "
               "The paper adapts W_q and W_v in every block; PEFT's all-linear adapts every "
               "linear layer of the block, and on a transformers PreTrainedModel leaves out "
               "the model's output layer (on any other model it adapts every linear layer).", b)


def fused_c_attn() -> str:
    """Chapter 7: GPT-2's fused c_attn and the two ways to put LoRA on it."""
    b = []
    sl = [("q", ADAPTER[0]), ("k", FROZEN), ("v", ADAPTER[2])]
    x0, cw = 110, 150                     # left edge of the weight, width of one slice

    def weight(y, cols, tags):
        out = [text(x0 - 14, y + 44, "W", "big", anchor="end"),
               text(x0 - 14, y + 66, "k × 3d", "s", anchor="end")]
        for i, ((name, _), col, tag) in enumerate(zip(sl, cols, tags)):
            out += [rect(x0 + cw * i, y, cw, 80, col, rx=2),
                    text(x0 + cw * i + cw / 2, y + 36, f"W_{{{name}}}", "math"),
                    text(x0 + cw * i + cw / 2, y + 60, tag, "s")]
        return out

    # the layer itself
    b += [text(20, 28, "GPT-2's c_attn: q, k and v from one Conv1D", "h", anchor="start"),
          text(20, 50, "weight k × 3d (nn.Linear's transpose): x W = [q | k | v]", "t",
               anchor="start")]
    b += weight(66, [c for _, c in sl], ["columns 0 … d−1", "columns d … 2d−1",
                                         "columns 2d … 3d−1"])
    # PEFT's plain LoRA on c_attn
    y = 190
    b += [text(20, y, "PEFT's LoRA on c_attn: one B A over all 3d outputs", "b",
               anchor="start")]
    b += [rect(x0, y + 14, 3 * cw, 30, B_COL, rx=3),
          text(x0 + 1.5 * cw, y + 35, "one update s·(B A)^{⊤}, B: 3d × r, A: r × k", "t"),
          text(x0 + 1.5 * cw, y + 64, "one shared A; W_{k} changes too", "s")]
    # MergedLinear
    y = 290
    b += [text(20, y, "loralib's MergedLinear, enable_lora = [True, False, True]", "b",
               anchor="start")]
    for i, (name, col) in enumerate(sl):
        x = x0 + cw * i
        if name == "k":
            b += [rect(x + 6, y + 14, cw - 12, 30, ("#ffffff", MUTED), rx=3, dash=True),
                  text(x + cw / 2, y + 35, "no adapter", "s")]
        else:
            b += [rect(x + 6, y + 14, cw - 12, 30, B_COL, rx=3),
                  text(x + cw / 2, y + 35, f"B_{{{name}}} A_{{{name}}}", "t")]
    b += [text(x0 + 1.5 * cw, y + 64, "own A_{i} (r × k) and B_{i} (d × r) per enabled slice; "
               "W_{k} exact", "s")]
    b += [text(20, y + 100, "The same function is a rank-2r LoRA whose A stacks A_{q}, A_{v} and "
               "whose B", "s", anchor="start"),
          text(20, y + 120, "is block-diagonal with zero rows for k: training it as plain "
               "LoRA would fill them.", "s", anchor="start")]
    return svg("fused-c-attn", 580, y + 136, "GPT-2's fused c_attn and LoRA",
               "GPT-2's c_attn is one Conv1D whose weight, k by 3d (the transpose of "
               "nn.Linear's layout), holds W_q, W_k and W_v side by side: columns 0 to d minus "
               "1 give the queries, d to 2d minus 1 the keys, 2d to 3d minus 1 the values. "
               "PEFT's LoRA on c_attn adds one update s times (B A) transposed across all 3d "
               "output columns, with one shared A, so W_k changes too. loralib's MergedLinear "
               "with enable_lora = [True, False, True] gives the q slice and the v slice their "
               "own A and B and the k slice none, so W_k stays exact. The same function is a "
               "rank-2r LoRA with A_q and A_v stacked and a block-diagonal B with zero rows "
               "for k.", b)


DIAGRAMS = {
    "lora_layer.svg": lora_layer,
    "merging.svg": merging,
    "multi_adapter_batching.svg": multi_adapter_batching,
    "qlora_dataflow.svg": qlora_dataflow,
    "ddp_vs_fsdp.svg": ddp_vs_fsdp,
    "lora_targets.svg": lora_targets,
    "fused_c_attn.svg": fused_c_attn,
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if a file in book/images/ differs from what this draws")
    parser.add_argument("--out", type=Path, default=OUT, help="output folder")
    args = parser.parse_args(argv)
    stale = []
    for name, draw in DIAGRAMS.items():
        target = args.out / name
        content = draw()
        if args.check:
            if not target.exists() or target.read_text(encoding="utf-8") != content:
                stale.append(name)
        else:
            args.out.mkdir(parents=True, exist_ok=True)
            target.write_text(content, encoding="utf-8")
            print(f"wrote {target}")
    if stale:
        print("stale diagrams (run scripts/make_diagrams.py):", ", ".join(stale))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
