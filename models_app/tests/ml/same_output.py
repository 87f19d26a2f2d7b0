"""Two extraction folders hold the same output: what a one-worker run and a run in parts (or a
resumed one) must share."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from models_app.ml.storage import verify


def assert_same_output(one: Path, other: Path, exact: bool = True) -> None:
    """Token ids equal; activations equal (bit for bit when `exact`); statistics equal (counts,
    histograms, min/max and norm quantiles exactly; means and variances to float64 rounding)."""
    m1 = json.loads((one / "manifest.json").read_text())
    m2 = json.loads((other / "manifest.json").read_text())
    assert verify(one) == [] and verify(other) == []
    assert (m1["n_sequences"], m1["n_tokens"]) == (m2["n_sequences"], m2["n_tokens"])
    for h1, h2 in zip(m1["hooks"], m2["hooks"], strict=True):
        assert [s["n_seq"] for s in h1["shards"]] == [s["n_seq"] for s in h2["shards"]]
        assert [s["file"] for s in h1["shards"]] == [s["file"] for s in h2["shards"]]
        for s1, s2 in zip(h1["shards"], h2["shards"], strict=True):
            a, b = load_file(one / s1["file"]), load_file(other / s2["file"])
            assert torch.equal(a["token_ids"], b["token_ids"])
            if exact:
                assert s1["sha256"] == s2["sha256"]
            torch.testing.assert_close(a["activations"], b["activations"], rtol=1e-5, atol=1e-5)
        assert_same_stats(h1["statistics"], h2["statistics"])


def assert_same_stats(a: dict, b: dict) -> None:
    for key in ("count", "n_tokens", "min", "max", "frac_near_zero", "nonfinite", "histogram"):
        assert a[key] == b[key], key
    for key in ("p50", "p99", "max"):
        assert a["norm"][key] == b["norm"][key], key
    assert a["norm"]["mean"] == pytest.approx(b["norm"]["mean"], rel=1e-12)
    assert a["mean"] == pytest.approx(b["mean"], rel=1e-9, abs=1e-12)
    assert a["std"] == pytest.approx(b["std"], rel=1e-9)
