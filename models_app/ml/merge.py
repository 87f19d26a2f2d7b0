"""Exact merge of the statistics of an extraction's shards (or parts) into one site's statistics.

Each finished shard stores its sites' accumulators (`StatsBank.state`, JSON). Merging them in
shard order gives what one uninterrupted run over the same batches gives:

- count, n_tokens, near-zero and inf/NaN counts, the value histogram (same fixed range in every
  part: the range the extraction's first batch set) and the log-spaced norm histogram: integer
  sums, exactly equal;
- min, max, norm max: exactly equal;
- mean and variance: Chan's parallel merge of (n, mean, M2) in float64, the formula a single run
  uses between its batches; equal to a single run up to float64 rounding (≈1e-15 relative);
- norm mean: a float64 sum, equal up to rounding;
- norm p50/p99: read from the merged norm histogram, so exactly the single run's values (both are
  the documented ≈1.2% approximation of the true quantile, see stats.py).

Nothing here knows about Django.
"""

from __future__ import annotations

from collections.abc import Iterable

from .stats import SiteStats, StatsBank


def merge_two(a: dict, b: dict) -> dict:
    """The state of the union of two sites' values (either may be empty: {"count": 0})."""
    if not a.get("count"):
        return dict(b)
    if not b.get("count"):
        return dict(a)
    if a["range"] != b["range"]:
        raise ValueError("value histograms with different ranges cannot be merged exactly")
    na, nb = a["count"], b["count"]
    total = na + nb
    delta = b["mean"] - a["mean"]
    hist = dict(a["norm_hist"])
    for j, n in b["norm_hist"].items():
        hist[j] = hist.get(j, 0) + n
    return {
        "count": total,
        "n_vectors": a["n_vectors"] + b["n_vectors"],
        "near_zero_threshold": a["near_zero_threshold"],
        "range": a["range"],
        "mean": a["mean"] + delta * (nb / total),
        "m2": a["m2"] + b["m2"] + delta * delta * (na * nb / total),
        "min": min(a["min"], b["min"]),
        "max": max(a["max"], b["max"]),
        "near_zero": a["near_zero"] + b["near_zero"],
        "nonfinite": a["nonfinite"] + b["nonfinite"],
        "norm_sum": a["norm_sum"] + b["norm_sum"],
        "norm_max": max(a["norm_max"], b["norm_max"]),
        "norm_hist": hist,
        "hist": [x + y for x, y in zip(a["hist"], b["hist"], strict=True)],
    }


def merge_states(states: Iterable[dict]) -> dict:
    """Fold states in order (shard 0 first) into one."""
    merged: dict = {"count": 0}
    for state in states:
        merged = merge_two(merged, state)
    return merged


def merged_stats(states: Iterable[dict]) -> SiteStats:
    """A SiteStats (to_dict() as a single run writes it) of the merged states."""
    bank = StatsBank.from_state(merge_states(states))
    return bank.sites()[0]
