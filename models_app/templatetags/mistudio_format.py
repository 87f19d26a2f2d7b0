"""Human formats for sizes, counts, rates and durations."""

from __future__ import annotations

from django import template

register = template.Library()


@register.filter
def bytes_h(value) -> str:
    """1234567 → '1.2 MB' (decimal units, as the Hub and disk tools show them)."""
    if value is None or value == "":
        return "—"
    n = float(value)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


@register.filter
def params_h(value) -> str:
    """124439808 → '124M', 1100048384 → '1.1B'."""
    if value is None or value == "":
        return "—"
    n = float(value)
    if n >= 1e9:
        return f"{n / 1e9:.1f}B"
    if n >= 1e6:
        return f"{n / 1e6:.0f}M" if n >= 1e7 else f"{n / 1e6:.1f}M"
    if n >= 1e3:
        return f"{n / 1e3:.0f}K"
    return f"{n:.0f}"


@register.filter
def rate_h(value) -> str:
    if not value:
        return "—"
    return f"{bytes_h(value)}/s"


@register.filter
def eta_h(value) -> str:
    """Seconds → '42 s', '3 min 5 s', '1 h 2 min'."""
    if value is None or value == "":
        return "—"
    s = int(round(float(value)))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {(s % 3600) // 60} min"
