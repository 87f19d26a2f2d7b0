"""Streaming per-site statistics, accumulated in float64 on the device of the activations.

`SiteStats.update` takes one batch (…, d) at a time and never holds more than fixed-size
accumulators, so the statistics of a billion-token extraction cost the same memory as one batch.
The accumulators are tensors on the input's device and `update` never synchronises a GPU after the
first batch; `to_dict` turns them into plain floats.

- mean / std: over every scalar value (Chan's parallel merge of per-batch mean and M2, fp64);
- min / max: signed;
- L2 norm of each token vector: mean, max, and p50/p99 from a fixed log-spaced histogram of norms
  (NORM_BINS_PER_DECADE bins per decade over 10^NORM_LOG10_MIN … 10^NORM_LOG10_MAX, relative error
  below 10^(1/NORM_BINS_PER_DECADE) - 1 ≈ 1.2%);
- fraction near zero: |x| < near_zero (absolute threshold, recorded);
- nonfinite: count of inf/NaN values (the caller treats any as a hard failure);
- value histogram for the UI: VALUE_BINS equal bins whose range is fixed on the first batch to its
  [min, max] widened by HIST_MARGIN of the span on each side; later values outside that range are
  counted in `underflow` / `overflow` rather than moving the bins.
"""

from __future__ import annotations

import math

import torch

NORM_LOG10_MIN, NORM_LOG10_MAX = -8, 8
NORM_BINS_PER_DECADE = 200
VALUE_BINS = 64
HIST_MARGIN = 0.5
NEAR_ZERO = 1e-6


class SiteStats:
    """Streaming statistics of one hook site's activations (see the module docstring)."""

    def __init__(self, near_zero: float = NEAR_ZERO, value_bins: int = VALUE_BINS):
        self.near_zero = near_zero
        self.value_bins = value_bins
        self.count = 0  # scalar values seen
        self.n_vectors = 0  # token vectors seen
        self._acc: dict[str, torch.Tensor] | None = None
        self._range: tuple[float, float] | None = None

    def _init(self, x: torch.Tensor) -> None:
        zeros = torch.zeros((), dtype=torch.float64, device=x.device)
        n_norm_bins = (NORM_LOG10_MAX - NORM_LOG10_MIN) * NORM_BINS_PER_DECADE
        self._acc = {
            "mean": zeros.clone(),
            "m2": zeros.clone(),
            "min": torch.full_like(zeros, math.inf),
            "max": torch.full_like(zeros, -math.inf),
            "near_zero": zeros.clone(),
            "nonfinite": zeros.clone(),
            "norm_sum": zeros.clone(),
            "norm_max": zeros.clone(),
            "norm_hist": torch.zeros(n_norm_bins, dtype=torch.float64, device=x.device),
            "hist": torch.zeros(self.value_bins, dtype=torch.float64, device=x.device),
            "underflow": zeros.clone(),
            "overflow": zeros.clone(),
        }
        finite = x[torch.isfinite(x)]
        # The only synchronisation: the value bins adapt once, to the first batch.
        lo, hi = (finite.min().item(), finite.max().item()) if finite.numel() else (-1.0, 1.0)
        span = hi - lo if hi > lo else 1.0
        self._range = (lo - HIST_MARGIN * span, hi + HIST_MARGIN * span)

    def update(self, x: torch.Tensor) -> None:
        """Add one batch of activations, shape (…, d), any float dtype, any device."""
        d = x.shape[-1]
        x = x.detach().reshape(-1, d).double()  # (N, d)
        if x.numel() == 0:
            return
        if self._acc is None:
            self._init(x)
        acc = self._acc
        acc["nonfinite"] += (~torch.isfinite(x)).sum()
        self._merge_moments(x)
        acc["min"] = torch.minimum(acc["min"], x.min())
        acc["max"] = torch.maximum(acc["max"], x.max())
        acc["near_zero"] += (x.abs() < self.near_zero).sum()
        self._update_norms(x.norm(dim=-1))  # (N,)
        self._update_hist(x)
        self.n_vectors += x.shape[0]

    def _merge_moments(self, x: torch.Tensor) -> None:
        acc, n_b = self._acc, x.numel()
        mean_b = x.mean()
        m2_b = (x - mean_b).square().sum()
        total = self.count + n_b
        delta = mean_b - acc["mean"]
        acc["mean"] += delta * (n_b / total)
        acc["m2"] += m2_b + delta.square() * (self.count * n_b / total)
        self.count = total

    def _update_norms(self, norms: torch.Tensor) -> None:
        acc = self._acc
        acc["norm_sum"] += norms.sum()
        acc["norm_max"] = torch.maximum(acc["norm_max"], norms.max())
        bins = acc["norm_hist"].numel()
        logn = norms.clamp(min=10.0**NORM_LOG10_MIN, max=10.0**NORM_LOG10_MAX).log10()  # (N,)
        acc["norm_hist"] += torch.histc(logn, bins, NORM_LOG10_MIN, NORM_LOG10_MAX)

    def _update_hist(self, x: torch.Tensor) -> None:
        acc, (lo, hi) = self._acc, self._range
        acc["hist"] += torch.histc(x, self.value_bins, lo, hi)  # out-of-range values ignored
        acc["underflow"] += (x < lo).sum()
        acc["overflow"] += (x > hi).sum()

    @property
    def nonfinite(self) -> int:
        """Number of inf/NaN values seen so far (synchronises the device)."""
        return 0 if self._acc is None else int(self._acc["nonfinite"].item())

    def norm_quantile(self, q: float) -> float:
        """Approximate q-quantile of the token L2 norms (log-linear interpolation in a bin)."""
        hist = self._acc["norm_hist"].cpu()
        cdf = hist.cumsum(0)  # (bins,)
        target = q * float(cdf[-1])
        i = int(
            torch.searchsorted(cdf, torch.tensor(target, dtype=cdf.dtype)).clamp(max=len(cdf) - 1)
        )
        below = float(cdf[i - 1]) if i > 0 else 0.0
        frac = (target - below) / float(hist[i]) if hist[i] > 0 else 0.0
        return 10.0 ** (NORM_LOG10_MIN + (i + frac) / NORM_BINS_PER_DECADE)

    def to_dict(self) -> dict:
        """JSON-ready statistics; values are floats/ints, `histogram.edges` has VALUE_BINS + 1."""
        if self._acc is None:
            return {"count": 0, "n_tokens": 0}
        acc = {k: v.cpu() for k, v in self._acc.items()}
        lo, hi = self._range
        return {
            "count": self.count,
            "n_tokens": self.n_vectors,
            "mean": float(acc["mean"]),
            "std": math.sqrt(float(acc["m2"]) / self.count),
            "min": float(acc["min"]),
            "max": float(acc["max"]),
            "norm": {
                "mean": float(acc["norm_sum"]) / self.n_vectors,
                "p50": self.norm_quantile(0.5),
                "p99": self.norm_quantile(0.99),
                "max": float(acc["norm_max"]),
            },
            "frac_near_zero": float(acc["near_zero"]) / self.count,
            "near_zero_threshold": self.near_zero,
            "nonfinite": int(acc["nonfinite"]),
            "histogram": {
                "edges": torch.linspace(lo, hi, self.value_bins + 1, dtype=torch.float64).tolist(),
                "counts": [int(c) for c in acc["hist"].tolist()],
                "underflow": int(acc["underflow"]),
                "overflow": int(acc["overflow"]),
            },
        }
