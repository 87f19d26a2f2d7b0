"""Streaming per-site statistics, accumulated in float64 on the device of the activations.

`SiteStats.update` takes one batch (…, d) at a time and never holds more than fixed-size
accumulators, so the statistics of a billion-token extraction cost the same memory as one batch.
The accumulators are tensors on the input's device and `update` never synchronises a GPU after the
first batch; `to_dict` turns them into plain floats. `StatsBank` does the same for S sites at once
from one stacked batch (S, …, d): on a GPU that is one set of kernel launches per batch instead of
one per site (the launches, not the arithmetic, are what the statistics cost there). On the CPU
the arithmetic and the memory traffic are the cost: there the sites' values (a view of the
staging buffer (S, B, T, d) the extraction copies them into, so nothing is stacked) are taken in
chunks of CPU_CHUNK_VALUES into one float64 working copy (and a few scratch buffers) allocated
once, so every pass after the first reads the cache, no temporary is allocated per batch (a fresh
full-batch temporary costs more in page faults than the pass itself), and a pass that a chunk
does not need (clamping into the bins, the near-zero count) is skipped.

- mean / std: over every scalar value (per-batch fp64 sums, Chan's merge of mean and M2 in fp64);
- min / max: signed;
- L2 norm of each token vector: mean, max, and p50/p99 from a fixed log-spaced histogram of norms
  (NORM_BINS_PER_DECADE bins per decade over 10^NORM_LOG10_MIN … 10^NORM_LOG10_MAX, relative error
  below 10^(1/NORM_BINS_PER_DECADE) - 1 ≈ 1.2%);
- fraction near zero: |x| < near_zero (absolute threshold, recorded);
- nonfinite: count of inf/NaN values (the caller treats any as a hard failure);
- value histogram for the UI: VALUE_BINS equal half-open bins whose range is fixed on the first
  batch (its first UPDATE_VALUES values) to its [min, max] widened by HIST_MARGIN of the span on
  each side; later values outside that range are counted in `underflow` / `overflow` rather than
  moving the bins.
"""

from __future__ import annotations

import math

import torch

NORM_LOG10_MIN, NORM_LOG10_MAX = -8, 8
NORM_BINS_PER_DECADE = 200
VALUE_BINS = 64
HIST_MARGIN = 0.5
NEAR_ZERO = 1e-6
# Values (all sites together) per step of StatsBank.update: its float32 temporaries stay under
# 128 MiB each, and a GPT-2-small batch of 32 × 256 tokens at 3 sites is one step.
UPDATE_VALUES = 2**25
# CPU: values (all sites together) of one chunk of StatsBank.update: its float64 working copy
# and scratch (~25 MiB) stay in the cache between the passes over it.
CPU_CHUNK_VALUES = 2**19


class StatsBank:
    """Streaming statistics of `n_sites` sites, updated together from stacked batches (S, …, d).

    Every site sees the same number of values per update. `sites()` gives a SiteStats view of
    each site, with the single-site API (to_dict, nonfinite, …).
    """

    def __init__(
        self,
        n_sites: int,
        near_zero: float = NEAR_ZERO,
        value_bins: int = VALUE_BINS,
        ranges: list[tuple[float, float]] | None = None,
    ):
        """ranges: the value-histogram range of each site, fixed ahead (an extraction split into
        parts gives every part the range its first batch set); None: from the first batch."""
        self.n_sites = n_sites
        self.preset_ranges = [tuple(r) for r in ranges] if ranges else None
        self.near_zero = near_zero
        self.value_bins = value_bins
        self.count = 0  # scalar values seen, per site
        self.n_vectors = 0  # token vectors seen, per site
        self._acc: dict[str, torch.Tensor] | None = None
        self._ranges: list[tuple[float, float]] | None = None  # value-histogram range per site
        self._lo_scale: torch.Tensor | None = None  # (2, S, 1, 1): lo and bins/(hi-lo) per site
        self._scratch: dict[str, torch.Tensor] = {}  # CPU: flat working buffers, by role
        self._hist_shift: tuple[torch.Tensor, ...] | None = None  # CPU: (S, 1, 1) shift, low, high
        self._range_lo: torch.Tensor | None = None  # (S,) the value bins' range, float64
        self._range_hi: torch.Tensor | None = None

    def sites(self) -> list[SiteStats]:
        return [SiteStats(bank=self, index=i) for i in range(self.n_sites)]

    def _init(self, x: torch.Tensor) -> None:
        S, f64 = self.n_sites, dict(dtype=torch.float64, device=x.device)
        i64 = dict(dtype=torch.int64, device=x.device)
        n_norm_bins = (NORM_LOG10_MAX - NORM_LOG10_MIN) * NORM_BINS_PER_DECADE
        self._acc = {
            "mean": torch.zeros(S, **f64),
            "m2": torch.zeros(S, **f64),
            "min": torch.full((S,), math.inf, **f64),
            "max": torch.full((S,), -math.inf, **f64),
            "near_zero": torch.zeros(S, **i64),
            "nonfinite": torch.zeros(S, **i64),
            "norm_sum": torch.zeros(S, **f64),
            "norm_max": torch.zeros(S, **f64),
            "norm_hist": torch.zeros(S, n_norm_bins, **i64),
            "hist": torch.zeros(S, self.value_bins + 2, **i64),  # [underflow, bins…, overflow]
        }
        # The only synchronisation: the value bins adapt once, to the first batch's finite range.
        self._ranges = self.preset_ranges or [_value_range(site) for site in x]
        lo = torch.tensor([r[0] for r in self._ranges], **f64)
        scale = torch.tensor([self.value_bins / (hi - lo) for lo, hi in self._ranges], **f64)
        # float32 for float32 values (GPU), float64 for the CPU's float64 working copy
        self._lo_scale = torch.stack([lo, scale]).to(x.dtype).view(2, S, 1, 1)
        self._range_lo = lo  # (S,) float64: a chunk within [lo, hi) needs no clamp (CPU)
        self._range_hi = torch.tensor([r[1] for r in self._ranges], **f64)

    def update(self, x: torch.Tensor) -> None:
        """Add one stacked batch of activations, shape (S, …, d), any float dtype, any device.

        GPU: taken UPDATE_VALUES values at a time, which bounds the temporaries (float32 copies);
        CPU: CPU_CHUNK_VALUES values at a time into one float64 working copy (see _update_cpu).
        x may be a view with any strides (a slice of a staging buffer (S, B, T, d))."""
        x = x.detach().reshape(self.n_sites, -1, x.shape[-1])  # (S, N, d)
        if x.is_cuda:
            rows = max(1, UPDATE_VALUES // (x.shape[0] * x.shape[2]))
            for part in x.split(rows, dim=1):  # (S, n, d)
                self._update(part)
            return
        if x.shape[1] == 0:
            return
        rows = max(1, CPU_CHUNK_VALUES // (self.n_sites * x.shape[2]))
        sq_norms = self._buffer("sq_norms", torch.float64, x.shape[:2])  # (S, N)
        sums = torch.zeros(self.n_sites, dtype=torch.float64)
        for start in range(0, x.shape[1], rows):
            part = x[:, start : start + rows]  # (S, n, d)
            sums += self._update_cpu(part, sq_norms[:, start : start + rows])
        self._merge_sums(sums, sq_norms, x.shape[1] * x.shape[2])
        self._update_norms(sq_norms.sqrt_())
        self.n_vectors += x.shape[1]

    def _buffer(self, role: str, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """A reused CPU scratch tensor of `shape` (grown when too small)."""
        size = math.prod(shape)
        buf = self._scratch.get(role)
        if buf is None or buf.numel() < size:
            buf = self._scratch[role] = torch.empty(size, dtype=dtype)
        return buf[:size].view(shape)

    def _update_cpu(self, part: torch.Tensor, sq_norms: torch.Tensor) -> torch.Tensor:
        """One chunk part (S, n, d) of a CPU batch: min/max, near-zero and value-histogram counts
        into the accumulators, each token's squared norm into sq_norms (S, n); returns the
        chunk's float64 sums (S,). One float64 working copy of the chunk, reused buffers, and
        the passes a chunk needs only when it needs them (clamping when it leaves the bins'
        range, the near-zero count when some |x| is below the threshold)."""
        acc, shape = self._acc, part.shape
        x = self._buffer("x", torch.float64, shape).copy_(part)  # (S, n, d): the working copy
        if acc is None:
            self._init(x)
            acc = self._acc
        torch.linalg.vector_norm(x, dim=-1, out=sq_norms).square_()  # (S, n)
        finite = bool(torch.isfinite(sq_norms).all())  # a token with inf/NaN has a non-finite norm
        if not finite:
            acc["nonfinite"] += torch.count_nonzero(~torch.isfinite(x), dim=(1, 2))
        lo, hi = part.amin(dim=(1, 2)).double(), part.amax(dim=(1, 2)).double()  # (S,) exact
        torch.minimum(acc["min"], lo, out=acc["min"])
        torch.maximum(acc["max"], hi, out=acc["max"])
        tmp = self._buffer("tmp", torch.float64, shape)
        self._count_near_zero(x, tmp)
        in_range = finite and bool((lo >= self._range_lo).all() and (hi < self._range_hi).all())
        self._update_hist_cpu(x, tmp, finite, in_range)
        return x.sum(dim=(1, 2))  # (S,) float64

    def _count_near_zero(self, x: torch.Tensor, tmp: torch.Tensor) -> None:
        # |x| < near_zero, counted only for the sites whose smallest |x| is below the threshold
        # (most chunks of most sites have none: one abs and one min instead of three passes).
        small = (torch.abs(x, out=tmp).amin(dim=(1, 2)) < self.near_zero).nonzero().flatten()
        for i in small.tolist():
            self._acc["near_zero"][i] += torch.count_nonzero(tmp[i] < self.near_zero)

    def _merge_sums(self, sums: torch.Tensor, sq_norms: torch.Tensor, n_b: int) -> None:
        """Chan's merge of one batch of n_b values per site, from its float64 sums (S,) and its
        tokens' squared norms (S, N) (M2_b = Σx² − n·mean², exact enough unless
        |mean| > 1e6·std)."""
        acc = self._acc
        mean_b = sums / n_b  # (S,)
        m2_b = (sq_norms.sum(dim=1) - n_b * mean_b.square()).clamp_min(0)  # (S,)
        total = self.count + n_b
        delta = mean_b - acc["mean"]
        acc["mean"] += delta * (n_b / total)
        acc["m2"] += m2_b + delta.square() * (self.count * n_b / total)
        self.count = total

    def _update_hist_cpu(self, x, tmp, finite: bool, in_range: bool) -> None:
        # _update_hist's bins, every site's counted in one bincount: site i's slot j is
        # i·(bins + 2) + j, from x·scale + (i·(bins + 2) + 1 − lo·scale), truncated (the slots
        # are ≥ 0, so that is the floor). A chunk inside every site's range stays inside the
        # site's slots without a clamp; one outside (or with inf/NaN) is clamped per site.
        lo, scale = self._lo_scale  # (S, 1, 1) each, float64
        if self._hist_shift is None:
            first = torch.arange(self.n_sites, dtype=x.dtype).view(-1, 1, 1) * (self.value_bins + 2)
            self._hist_shift = (first + 1 - lo * scale, first, first + self.value_bins + 1)
        shift, low, high = self._hist_shift
        torch.mul(x, scale, out=tmp).add_(shift)
        if not finite:  # NaN would survive the clamp; it has no bin (counted as nonfinite)
            tmp.nan_to_num_(nan=-1.0)
        if not in_range:
            tmp.clamp_(low, high)
        idx = self._buffer("idx", torch.int64, x.shape).copy_(tmp)  # truncation = floor here
        counts = torch.bincount(idx.view(-1), minlength=self.n_sites * (self.value_bins + 2))
        self._acc["hist"] += counts.view(self.n_sites, -1)

    def _update(self, x: torch.Tensor) -> None:
        if x.dtype not in (torch.float32, torch.float64):
            x = x.float()  # bf16/fp16 -> fp32 is exact; fp32 is used as is, without a copy
        if x.numel() == 0:
            return
        if self._acc is None:
            self._init(x)
        acc = self._acc
        sq_norms = torch.linalg.vector_norm(x, dim=-1, dtype=torch.float64).square()  # (S, N)
        # counted on every step: checking first would synchronise the GPU
        acc["nonfinite"] += torch.count_nonzero(~torch.isfinite(x), dim=(1, 2))
        sums = x.sum(dim=(1, 2), dtype=torch.float64)  # (S,)
        self._merge_sums(sums, sq_norms, x.shape[1] * x.shape[2])
        lo, hi = torch.aminmax(x.reshape(self.n_sites, -1), dim=1)  # (S,) each
        torch.minimum(acc["min"], lo.double(), out=acc["min"])
        torch.maximum(acc["max"], hi.double(), out=acc["max"])
        acc["near_zero"] += torch.count_nonzero(x.abs() < self.near_zero, dim=(1, 2))
        self._update_norms(sq_norms.sqrt())
        self._update_hist(x)
        self.n_vectors += x.shape[1]

    def _update_norms(self, norms: torch.Tensor) -> None:  # norms: (S, N)
        acc = self._acc
        acc["norm_sum"] += norms.sum(dim=1)
        torch.maximum(acc["norm_max"], norms.amax(dim=1), out=acc["norm_max"])
        bins = acc["norm_hist"].shape[1]
        logn = norms.clamp(min=10.0**NORM_LOG10_MIN, max=10.0**NORM_LOG10_MAX).log10()  # (S, N)
        idx = ((logn - NORM_LOG10_MIN) * NORM_BINS_PER_DECADE).floor_().clamp_(0, bins - 1)
        acc["norm_hist"] += _bincount_per_site(idx, bins)

    def _update_hist(self, x: torch.Tensor) -> None:
        # Bin i covers [lo + i·w, lo + (i+1)·w); slot 0 is underflow, slot bins + 1 overflow.
        lo, scale = self._lo_scale.to(x.device)
        idx = ((x - lo) * scale).floor_().clamp_(-1, self.value_bins).add_(1)  # (S, N, d)
        self._acc["hist"] += _bincount_per_site(idx, self.value_bins + 2)

    @property
    def ranges(self) -> list[tuple[float, float]] | None:
        """The value-histogram range of each site (None before the first batch)."""
        return self._ranges

    def state(self, i: int) -> dict:
        """Site i's accumulators, JSON-ready (exact: Python floats round-trip through JSON);
        see merge.py. The norm histogram is sparse: {bin: count}."""
        if self._acc is None:
            return {"count": 0}
        acc = {k: v[i].cpu() for k, v in self._acc.items()}
        hist = acc.pop("norm_hist")
        nz = torch.nonzero(hist).flatten().tolist()
        return {
            "count": self.count,
            "n_vectors": self.n_vectors,
            "near_zero_threshold": self.near_zero,
            "range": list(self._ranges[i]),
            **{k: v.tolist() for k, v in acc.items()},
            "norm_hist": {str(j): int(hist[j]) for j in nz},
        }

    @classmethod
    def from_state(cls, state: dict, value_bins: int = VALUE_BINS) -> StatsBank:
        """A bank of one site holding the accumulators of `state` (from `state` or a merge)."""
        bank = cls(1, state.get("near_zero_threshold", NEAR_ZERO), value_bins)
        if not state.get("count"):
            return bank
        f64, i64 = dict(dtype=torch.float64), dict(dtype=torch.int64)
        n_norm_bins = (NORM_LOG10_MAX - NORM_LOG10_MIN) * NORM_BINS_PER_DECADE
        norm_hist = torch.zeros(1, n_norm_bins, **i64)
        for j, n in state["norm_hist"].items():
            norm_hist[0, int(j)] = n
        floats = ("mean", "m2", "min", "max", "norm_sum", "norm_max")
        bank._acc = {k: torch.tensor([state[k]], **f64) for k in floats}
        bank._acc.update({k: torch.tensor([state[k]], **i64) for k in ("near_zero", "nonfinite")})
        bank._acc["norm_hist"] = norm_hist
        bank._acc["hist"] = torch.tensor([state["hist"]], **i64)
        bank._ranges = [tuple(state["range"])]
        bank.count, bank.n_vectors = state["count"], state["n_vectors"]
        return bank

    def nonfinite_tensor(self) -> torch.Tensor:
        """The inf/NaN counts so far, (S,) int64 on the activations' device (no sync)."""
        return self._acc["nonfinite"]

    def to_dict(self, i: int) -> dict:
        """JSON-ready statistics of site i; `histogram.edges` has VALUE_BINS + 1 values."""
        if self._acc is None:
            return {"count": 0, "n_tokens": 0}
        acc = {k: v[i].cpu() for k, v in self._acc.items()}
        lo, hi = self._ranges[i]
        return {
            "count": self.count,
            "n_tokens": self.n_vectors,
            "mean": float(acc["mean"]),
            "std": math.sqrt(float(acc["m2"]) / self.count),
            "min": float(acc["min"]),
            "max": float(acc["max"]),
            "norm": {
                "mean": float(acc["norm_sum"]) / self.n_vectors,
                "p50": _quantile(acc["norm_hist"], 0.5),
                "p99": _quantile(acc["norm_hist"], 0.99),
                "max": float(acc["norm_max"]),
            },
            "frac_near_zero": int(acc["near_zero"]) / self.count,
            "near_zero_threshold": self.near_zero,
            "nonfinite": int(acc["nonfinite"]),
            "histogram": {
                "edges": torch.linspace(lo, hi, self.value_bins + 1, dtype=torch.float64).tolist(),
                "counts": acc["hist"][1:-1].tolist(),
                "underflow": int(acc["hist"][0]),
                "overflow": int(acc["hist"][-1]),
            },
        }


class SiteStats:
    """Streaming statistics of one hook site's activations (see the module docstring): a bank of
    one site of its own, or site `index` of a shared StatsBank (updated through the bank)."""

    def __init__(
        self,
        near_zero: float = NEAR_ZERO,
        value_bins: int = VALUE_BINS,
        *,
        bank: StatsBank | None = None,
        index: int = 0,
    ):
        self.bank = bank or StatsBank(1, near_zero, value_bins)
        self.index = index

    def update(self, x: torch.Tensor) -> None:
        """Add one batch of activations, shape (…, d) (a bank of one site only)."""
        if self.bank.n_sites != 1:
            raise ValueError("update a shared StatsBank with a stacked batch instead")
        self.bank.update(x.unsqueeze(0))

    @property
    def count(self) -> int:
        return self.bank.count

    @property
    def n_vectors(self) -> int:
        return self.bank.n_vectors

    def nonfinite_tensor(self) -> torch.Tensor:
        """The inf/NaN count so far as a 0-d int64 tensor on the activations' device (no sync)."""
        return self.bank.nonfinite_tensor()[self.index]

    @property
    def nonfinite(self) -> int:
        """Number of inf/NaN values seen so far (synchronises the device)."""
        return 0 if self.bank._acc is None else int(self.nonfinite_tensor().item())

    def norm_quantile(self, q: float) -> float:
        """Approximate q-quantile of the token L2 norms (log-linear interpolation in a bin)."""
        return _quantile(self.bank._acc["norm_hist"][self.index].cpu(), q)

    def to_dict(self) -> dict:
        return self.bank.to_dict(self.index)


def _value_range(x: torch.Tensor) -> tuple[float, float]:
    """[min, max] of the finite values of x, widened by HIST_MARGIN of the span on each side."""
    lo, hi = (v.item() for v in torch.aminmax(x))
    if not (math.isfinite(lo) and math.isfinite(hi)):  # rare: mask out the inf/NaN (a copy)
        finite = x[torch.isfinite(x)]
        lo, hi = (finite.min().item(), finite.max().item()) if finite.numel() else (-1.0, 1.0)
    span = hi - lo if hi > lo else 1.0
    return lo - HIST_MARGIN * span, hi + HIST_MARGIN * span


def _quantile(hist: torch.Tensor, q: float) -> float:
    """Approximate q-quantile of the norms counted in the log-spaced histogram `hist` (CPU)."""
    cdf = hist.cumsum(0)  # (bins,)
    target = q * float(cdf[-1])
    i = int(torch.searchsorted(cdf, torch.tensor(target, dtype=cdf.dtype)).clamp(max=len(cdf) - 1))
    below = float(cdf[i - 1]) if i > 0 else 0.0
    frac = (target - below) / float(hist[i]) if hist[i] > 0 else 0.0
    return 10.0 ** (NORM_LOG10_MIN + (i + frac) / NORM_BINS_PER_DECADE)


def _bincount_per_site(idx: torch.Tensor, n: int) -> torch.Tensor:
    """int64 counts (S, n) of each site's integer-valued float indices idx (S, …) in 0 … n-1."""
    S = idx.shape[0]
    offsets = torch.arange(S, device=idx.device, dtype=idx.dtype).view(S, *[1] * (idx.dim() - 1))
    return _bincount(idx + offsets * n, S * n).view(S, n)


def _bincount(idx: torch.Tensor, n: int) -> torch.Tensor:
    """int64 counts (n,) of the integer-valued float tensor idx, values in 0 … n-1.

    torch.bincount reads max(idx) back to size its output, which would synchronise a GPU; there
    histc counts instead, in chunks of 2^24 values so that its float32 counts stay exact.
    """
    flat = idx.reshape(-1)
    if not flat.is_cuda:
        return torch.bincount(flat.long().clamp_(0, n - 1), minlength=n)  # NaN casts to < 0
    counts = torch.zeros(n, dtype=torch.int64, device=flat.device)
    for part in flat.split(2**24):
        counts += torch.histc(part, n, 0, n).long()
    return counts
