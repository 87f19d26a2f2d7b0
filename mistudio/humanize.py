"""Human formats for sizes, counts, rates and durations (plain Python: `ml/` uses them too).

Decimal units, as the Hub and disk tools show sizes: 1 KB = 1000 B.
"""

from __future__ import annotations


def bytes_h(value) -> str:
    """1_234_567 → '1.2 MB', 512 → '512 B'; None or '' → '—'."""
    if value is None or value == "":
        return "—"
    n = float(value)
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def params_h(value) -> str:
    """124_439_808 → '124M', 1_100_048_384 → '1.1B', 557_696 → '558K'; None → '—'."""
    if value is None or value == "":
        return "—"
    n = float(value)
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return _short(n / scale) + unit
    return f"{n:.0f}"


def rate_h(value) -> str:
    """Bytes per second → '1.2 MB/s'; 0 or None → '—'."""
    if not value:
        return "—"
    return f"{bytes_h(value)}/s"


def eta_h(value) -> str:
    """Seconds → '42 s', '3 min 5 s', '1 h 2 min'; None → '—'."""
    if value is None or value == "":
        return "—"
    s = int(round(float(value)))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {(s % 3600) // 60} min"


def _short(value: float) -> str:
    """One decimal below 10 ('1.1', '7.2'), none above ('124'); a trailing '.0' dropped."""
    text = f"{value:.1f}" if value < 10 else f"{value:.0f}"
    return text.removesuffix(".0")
