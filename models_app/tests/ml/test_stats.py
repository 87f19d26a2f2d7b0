"""Streaming per-site statistics against exact numpy answers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from models_app.ml import stats as stats_module
from models_app.ml.stats import VALUE_BINS, SiteStats, StatsBank


def _data(seed: int = 0, n: int = 4000, d: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) * torch.linspace(0.1, 3.0, d)  # (n, d)
    x[::7, 3] = 0.0  # exact zeros
    x[::11] *= 20  # a heavy tail of large-norm tokens
    return x


def _streamed(x: torch.Tensor, batches: int) -> SiteStats:
    stats = SiteStats()
    for chunk in x.chunk(batches):
        stats.update(chunk.reshape(-1, 8, x.shape[-1]) if chunk.shape[0] % 8 == 0 else chunk)
    return stats


def test_it_matches_exact_statistics():
    x = _data()
    s = _streamed(x, batches=10).to_dict()
    ref = x.double().numpy()
    norms = np.linalg.norm(ref, axis=1)
    assert s["count"] == ref.size and s["n_tokens"] == ref.shape[0]
    assert s["mean"] == pytest.approx(ref.mean(), rel=1e-9, abs=1e-12)
    assert s["std"] == pytest.approx(ref.std(), rel=1e-9)
    assert (s["min"], s["max"]) == (ref.min(), ref.max())
    assert s["norm"]["mean"] == pytest.approx(norms.mean(), rel=1e-9)
    assert s["norm"]["max"] == pytest.approx(norms.max(), rel=1e-12)
    assert s["norm"]["p50"] == pytest.approx(np.quantile(norms, 0.5), rel=0.015)
    assert s["norm"]["p99"] == pytest.approx(np.quantile(norms, 0.99), rel=0.015)
    assert s["frac_near_zero"] == pytest.approx((np.abs(ref) < 1e-6).mean(), rel=1e-12)
    assert s["nonfinite"] == 0


def test_it_does_not_depend_on_how_the_data_is_batched():
    x = _data(seed=1)
    one, many = _streamed(x, 1).to_dict(), _streamed(x, 40).to_dict()
    for key in ("mean", "std", "min", "max", "frac_near_zero"):
        assert many[key] == pytest.approx(one[key], rel=1e-10)
    assert many["norm"] == pytest.approx(one["norm"], rel=1e-10)


def test_fp64_accumulation_keeps_the_std_of_data_with_a_large_offset():
    x = 1e4 + torch.randn(200_000, 4, generator=torch.Generator().manual_seed(2))  # float32
    s = _streamed(x, batches=50).to_dict()
    assert s["std"] == pytest.approx(x.double().numpy().std(), rel=1e-6)
    assert s["mean"] == pytest.approx(x.double().numpy().mean(), rel=1e-12)


def test_the_histogram_bins_are_fixed_on_the_first_batch_and_count_everything():
    x = _data(seed=3)
    stats = SiteStats()
    stats.update(x[:100])
    stats.update(x[100:] * 5)  # later batches may fall outside the first batch's range
    h = stats.to_dict()["histogram"]
    assert len(h["edges"]) == VALUE_BINS + 1 and len(h["counts"]) == VALUE_BINS
    lo, hi = float(x[:100].min()), float(x[:100].max())
    assert h["edges"][0] < lo and h["edges"][-1] > hi  # widened by a margin
    assert sum(h["counts"]) + h["underflow"] + h["overflow"] == x.numel()
    assert h["underflow"] > 0 and h["overflow"] > 0
    edges = np.array(h["edges"])
    inside = torch.cat([x[:100], x[100:] * 5]).double().numpy()
    inside = inside[(inside >= edges[0]) & (inside <= edges[-1])]
    expected, _ = np.histogram(inside, bins=edges)
    assert np.abs(np.array(h["counts"]) - expected).sum() <= 2  # bin-edge rounding only


def test_inf_and_nan_are_counted():
    x = _data(seed=4)
    x[5, 0], x[9, 1], x[9, 2] = math.inf, -math.inf, math.nan
    stats = SiteStats()
    stats.update(x)
    assert stats.nonfinite == 3


def test_to_dict_is_json_ready_and_empty_stats_are_explicit():
    assert SiteStats().to_dict() == {"count": 0, "n_tokens": 0}
    stats = SiteStats()
    stats.update(_data(seed=5).to(torch.bfloat16))  # any float dtype is accepted
    json.dumps(stats.to_dict(), allow_nan=False)


def test_a_bank_of_sites_matches_one_statistics_object_per_site(monkeypatch):
    sites = [_data(seed=10 + i, n=800) for i in range(3)]  # each (n, d)
    alone = [_streamed(x, batches=4).to_dict() for x in sites]
    monkeypatch.setattr(stats_module, "UPDATE_VALUES", 1000)  # many steps per update
    bank = StatsBank(3)
    for chunk in torch.stack(sites).chunk(4, dim=1):  # (3, n/4, d)
        bank.update(chunk)
    for i, want in enumerate(alone):
        got = bank.sites()[i].to_dict()
        assert got["count"] == want["count"] and got["nonfinite"] == 0
        for key in ("mean", "std", "min", "max", "frac_near_zero"):
            assert got[key] == pytest.approx(want[key], rel=1e-10)
        assert got["norm"] == pytest.approx(want["norm"], rel=1e-10)
        total = sum(got["histogram"]["counts"]) + got["histogram"]["underflow"]
        assert total + got["histogram"]["overflow"] == sites[i].numel()


def test_a_bank_counts_inf_and_nan_per_site():
    x = torch.stack([_data(seed=20), _data(seed=21)])  # (2, n, d)
    x[1, 3, 0] = math.nan
    bank = StatsBank(2)
    bank.update(x)
    assert [s.nonfinite for s in bank.sites()] == [0, 1]


def test_a_bank_reads_a_strided_view_of_a_staging_buffer_like_a_copy():
    # the extraction's last batch may fill b < B sequences of a (S, B, T, d) buffer
    g = torch.Generator().manual_seed(30)
    stack = torch.randn(3, 8, 16, 32, generator=g)  # (S, B, T, d)
    stack[1, :, :, 5] = 0.0  # exact zeros in one site only
    view, copy = StatsBank(3), StatsBank(3)
    for b in (8, 3):
        view.update(stack[:, :b])  # not contiguous across sites
        copy.update(stack[:, :b].contiguous())
    for got, want in zip(view.sites(), copy.sites(), strict=True):
        assert got.to_dict() == want.to_dict()
    assert (
        view.sites()[1].to_dict()["frac_near_zero"]
        > 0
        == view.sites()[0].to_dict()["frac_near_zero"]
    )
