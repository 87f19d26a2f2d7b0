"""Server-rendered SVG charts (no JS): a site's value histogram and the activation norm by layer.

Every chart has its axes labelled with their ranges: the histogram its value range (x) and its
peak count (y); the norm chart the layers (x) and the L2-norm range (y), one line per hook type
(solid: mean of ‖x‖ over tokens; dashed: its p99), with a legend.
"""

from __future__ import annotations

import re

from django import template
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString

register = template.Library()

WIDTH, HEIGHT = 240, 56
AXIS = 14  # px under / left of a histogram for its labels
SITE_RE = re.compile(r"^blocks\.(\d+)\.(?:attn\.)?hook_(\w+)$")
# one colour per hook type (Tailwind 400s), in the order the legend lists them
HOOK_COLOURS = {
    "resid_pre": "#94a3b8", "resid_post": "#34d399", "attn_out": "#60a5fa",
    "mlp_out": "#c084fc", "z": "#fbbf24",
}  # fmt: skip


def _bars(counts: list[int], height: int) -> list[tuple[float, float, float, float]]:
    peak = max(counts) or 1
    step = WIDTH / len(counts)
    out = []
    for i, c in enumerate(counts):
        h = height * c / peak
        out.append(
            (round(i * step, 2), round(height - h, 2), round(max(step - 0.5, 0.5), 2), round(h, 2))
        )
    return out


@register.filter
def histogram_svg(hist: dict | None) -> SafeString | str:
    """An SVG bar chart of {edges, counts} with its value range under it and its peak count;
    '' when there is nothing to draw."""
    counts = (hist or {}).get("counts") or []
    edges = (hist or {}).get("edges") or []
    if not counts or len(edges) != len(counts) + 1:
        return ""
    rects = format_html_join(
        "", '<rect x="{}" y="{}" width="{}" height="{}"></rect>', _bars(counts, HEIGHT)
    )
    lo, hi = f"{edges[0]:.3g}", f"{edges[-1]:.3g}"
    return format_html(
        '<svg class="histogram text-purple-400" viewBox="0 0 {w} {h}" width="{w}" height="{h}"'
        ' role="img" aria-label="Value histogram from {lo} to {hi}, peak {peak} values">'
        '<g fill="currentColor">{rects}</g>'
        '<g class="axis" fill="#94a3b8" font-size="9" font-family="ui-monospace,monospace">'
        '<text x="0" y="{ty}">{lo}</text><text x="{w}" y="{ty}" text-anchor="end">{hi}</text>'
        '<text x="{mid}" y="{ty}" text-anchor="middle">value</text>'
        '<text x="{w}" y="9" text-anchor="end">n≤{peak}</text></g></svg>',
        w=WIDTH,
        h=HEIGHT + AXIS,
        ty=HEIGHT + AXIS - 3,
        mid=WIDTH // 2,
        lo=lo,
        hi=hi,
        peak=max(counts),
        rects=rects,
    )


def norm_series(statistics: dict | None) -> dict[str, list[tuple[int, float, float]]]:
    """{hook type: [(layer, ‖x‖ mean, ‖x‖ p99), …] by layer} from an extraction's statistics."""
    series: dict[str, list[tuple[int, float, float]]] = {}
    for name, stats in (statistics or {}).items():
        match = SITE_RE.match(name)
        norm = (stats or {}).get("norm") or {}
        if not match or norm.get("mean") is None or norm.get("p99") is None:
            continue
        hook = match.group(2)
        series.setdefault(hook, []).append((int(match.group(1)), norm["mean"], norm["p99"]))
    order = list(HOOK_COLOURS)

    def rank(hook: str) -> int:
        return order.index(hook) if hook in order else len(order)

    return {hook: sorted(series[hook]) for hook in sorted(series, key=rank)}


CW, CH, LEFT, BOTTOM, TOP, RIGHT = 520, 200, 52, 34, 10, 110


def _scale(lo: float, hi: float, size: float, flip: bool):
    span = (hi - lo) or 1.0

    def f(v: float) -> float:
        t = (v - lo) / span
        return round((1 - t) * size if flip else t * size, 2)

    return f


@register.filter
def norm_by_layer_svg(statistics: dict | None) -> SafeString | str:
    """A line chart of the L2-norm mean (solid) and p99 (dashed) of every site by layer, one
    colour per hook type; '' when no site has norm statistics."""
    series = norm_series(statistics)
    if not series:
        return ""
    layers = sorted({layer for points in series.values() for layer, *_ in points})
    values = [v for points in series.values() for _, mean, p99 in points for v in (mean, p99)]
    y_lo, y_hi = 0.0, max(values) * 1.05 or 1.0
    x = _scale(layers[0], layers[-1], CW - LEFT - RIGHT, False)
    y = _scale(y_lo, y_hi, CH - TOP - BOTTOM, True)
    lines, legend = [], []
    for i, (hook, points) in enumerate(series.items()):
        colour = HOOK_COLOURS.get(hook, "#e2e8f0")
        for idx, dash in ((1, ""), (2, "4 3")):
            path = " ".join(f"{LEFT + x(p[0])},{TOP + y(p[idx])}" for p in points)
            lines.append((path, colour, dash, f"hook_{hook} {'mean' if idx == 1 else 'p99'}"))
        legend.append((CW - RIGHT + 12, TOP + 14 + 16 * i, colour, f"hook_{hook}"))
    polylines = format_html_join(
        "", '<polyline class="series" points="{}" stroke="{}" stroke-dasharray="{}" fill="none"'
        ' stroke-width="2"><title>{}</title></polyline>', lines,
    )  # fmt: skip
    dots = format_html_join(
        "", '<circle cx="{}" cy="{}" r="2.5" fill="{}"></circle>',
        ((LEFT + x(p[0]), TOP + y(p[1]), HOOK_COLOURS.get(h, "#e2e8f0"))
         for h, pts in series.items() for p in pts),
    )  # fmt: skip
    keys = format_html_join(
        "", '<rect x="{}" y="{}" width="10" height="3" fill="{}"></rect>'
        '<text x="{}" y="{}">{}</text>',
        ((lx, ly - 3, c, lx + 14, ly, label) for lx, ly, c, label in legend),
    )  # fmt: skip
    x_ticks = format_html_join(
        "", '<text x="{}" y="{}" text-anchor="middle">{}</text>',
        ((LEFT + x(layer), CH - BOTTOM + 14, layer) for layer in layers),
    )  # fmt: skip
    return format_html(
        '<svg class="norm-chart" viewBox="0 0 {w} {h}" width="100%" style="max-width:{w}px"'
        ' role="img" aria-label="L2 norm by layer: {hooks}; 0 to {top}">'
        '<g stroke="#334155"><line x1="{l}" y1="{t}" x2="{l}" y2="{b}"></line>'
        '<line x1="{l}" y1="{b}" x2="{r}" y2="{b}"></line></g>{polylines}{dots}'
        '<g fill="#94a3b8" font-size="10" font-family="ui-monospace,monospace">{x_ticks}'
        '<text x="{l}" y="{b}" dx="-4" text-anchor="end">0</text>'
        '<text x="{l}" y="{t}" dx="-4" dy="8" text-anchor="end">{top}</text>'
        '<text x="{xmid}" y="{h}" dy="-2" text-anchor="middle">layer</text>'
        '<text transform="translate(12 {ymid}) rotate(-90)" text-anchor="middle">'
        "‖x‖₂ (— mean, ┄ p99)</text>{keys}</g></svg>",
        w=CW, h=CH, l=LEFT, t=TOP, b=CH - BOTTOM, r=CW - RIGHT, top=f"{y_hi:.3g}",
        xmid=LEFT + (CW - LEFT - RIGHT) // 2, ymid=TOP + (CH - TOP - BOTTOM) // 2,
        hooks=", ".join(f"hook_{h}" for h in series), polylines=polylines, dots=dots,
        x_ticks=x_ticks, keys=keys,
    )  # fmt: skip
