"""Server-rendered SVG charts (no JS): the value histogram of an extraction site."""

from __future__ import annotations

from django import template
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString

register = template.Library()

WIDTH, HEIGHT = 240, 56


def _bars(counts: list[int]) -> list[tuple[float, float, float, float]]:
    peak = max(counts) or 1
    step = WIDTH / len(counts)
    out = []
    for i, c in enumerate(counts):
        h = HEIGHT * c / peak
        out.append(
            (round(i * step, 2), round(HEIGHT - h, 2), round(max(step - 0.5, 0.5), 2), round(h, 2))
        )
    return out


@register.filter
def histogram_svg(hist: dict | None) -> SafeString | str:
    """An SVG bar chart of {edges, counts}; '' when there is nothing to draw."""
    counts = (hist or {}).get("counts") or []
    edges = (hist or {}).get("edges") or []
    if not counts or len(edges) != len(counts) + 1:
        return ""
    rects = format_html_join(
        "", '<rect x="{}" y="{}" width="{}" height="{}"></rect>', _bars(counts)
    )
    return format_html(
        '<svg class="histogram text-purple-400" viewBox="0 0 {w} {h}" width="{w}" height="{h}"'
        ' role="img" aria-label="Value histogram from {lo} to {hi}"'
        ' fill="currentColor">{rects}</svg>',
        w=WIDTH,
        h=HEIGHT,
        lo=f"{edges[0]:.3g}",
        hi=f"{edges[-1]:.3g}",
        rects=rects,
    )
