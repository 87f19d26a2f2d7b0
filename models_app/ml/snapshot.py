"""Device-side snapshots of hooked tensors, and their statistics, stacked by vector width.

A block may change a hooked tensor in place after the hook returned (Falcon's parallel block:
`mlp_output += attention_output`). So at hook time every site's tensor is copied, on its device,
into a buffer that nothing else touches; the device->host copy and the statistics read that
snapshot, never the live tensor. The copy is cheap next to the device->host copy, and it replaces
the torch.stack the stacked statistics needed anyway, so it adds no memory traffic.

Sites are grouped by the width of one token's vector (d for the residual sites, H·d_head for
hook_z, anything for a module path); each group is one buffer (S, B, T, width) and one
StatsBank, updated with one stacked call per batch. On the CPU, where the staging copy into host
memory is itself taken at hook time, that copy is the snapshot (no second copy): the statistics
read the staging slot's stacked buffers (`update_stats_from`); the buffers here serve CUDA.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .stats import SiteStats, StatsBank


class SiteSnapshots:
    """Snapshot buffers and statistics for `names` (site names, in the order of the caller).

    shapes: {name: shape of one token's tensor}; buffers hold `batch` sequences of `context`
    tokens on `device`, in the dtype of the first tensor taken (allocated on first use).
    """

    def __init__(self, names: Sequence[str], shapes: dict[str, tuple[int, ...]], batch: int,
                 context: int, device: torch.device,
                 ranges: dict[str, tuple[float, float]] | None = None):  # fmt: skip
        self.names, self.shapes = list(names), shapes
        self.batch, self.context, self.device = batch, context, device
        self.groups: dict[int, list[str]] = {}  # width -> names
        for name in self.names:
            self.groups.setdefault(math.prod(shapes[name]), []).append(name)
        self.where = {n: (w, i) for w, names in self.groups.items() for i, n in enumerate(names)}
        self.banks = {
            w: StatsBank(len(names), ranges=[ranges[n] for n in names] if ranges else None)
            for w, names in self.groups.items()
        }  # ranges: each site's value-histogram range fixed ahead (see StatsBank)
        views = {w: bank.sites() for w, bank in self.banks.items()}
        self.stats: dict[str, SiteStats] = {n: views[w][i] for n, (w, i) in self.where.items()}
        self.buffers: dict[int, torch.Tensor] = {}  # width -> (S_w, B, T, width)

    def take(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """Copy t (b, T, *shape) into its snapshot now; returns the snapshot (b, T, *shape)."""
        width, i = self.where[name]
        buf = self.buffers.get(width)
        if buf is None:
            shape = (len(self.groups[width]), self.batch, self.context, width)  # (S, B, T, w)
            buf = self.buffers[width] = torch.empty(shape, dtype=t.dtype, device=self.device)
        b = t.shape[0]
        snap = buf[i, :b].view(b, self.context, *self.shapes[name])  # (b, T, *shape)
        snap.copy_(t)
        return snap

    def take_site(self, site, t: torch.Tensor) -> None:
        """A capture sink: take(site.name, t)."""
        self.take(site.name, t)

    def update_stats(self, b: int) -> None:
        """One stacked statistics update per width group, from the snapshots of b sequences."""
        for width, bank in self.banks.items():
            bank.update(self.buffers[width][:, :b])  # (S_w, b, T, w)

    def value_ranges(self) -> dict[str, tuple[float, float]]:
        """{site name: value-histogram range}, once the first batch was counted."""
        return {n: self.banks[w].ranges[i] for n, (w, i) in self.where.items()}

    def update_stats_from(self, stacks: dict[int, torch.Tensor], b: int) -> None:
        """CPU: one statistics update per width group from the staged copies of this batch,
        stacks[width] (S_w, B, T, w) with the sites in this object's group order (a staging
        slot's, see StagingPool), of which b sequences are valid; no snapshot, no stacking."""
        for width, bank in self.banks.items():
            bank.update(stacks[width][:, :b])  # (S_w, b, T, w)

    def nonfinite_tensor(self) -> torch.Tensor:
        """(len(names),) inf/NaN counts so far, in the caller's order, on the device."""
        counts = {w: bank.nonfinite_tensor() for w, bank in self.banks.items()}
        return torch.stack([counts[w][i] for w, i in (self.where[n] for n in self.names)])
