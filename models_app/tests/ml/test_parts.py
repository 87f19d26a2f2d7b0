"""An extraction split into parts, run in any order and resumed after a kill, writes what one
uninterrupted run writes: same token ids, shard files and boundaries, statistics (merge.py)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from models_app.ml.extract import ExtractionCancelled, ExtractionSpec, run_extraction
from models_app.ml.merge import merge_states
from models_app.ml.parts import (
    finish_extraction,
    plan_extraction,
    run_shards,
    shard_finished,
    split_shards,
)
from models_app.ml.stats import StatsBank

from .conftest import corpus, hidden_states
from .same_output import assert_same_output, assert_same_stats

SPEC = dict(layers=[0, 1], hook_types=["residual", "attention", "mlp"], context_size=16,
            batch_size=3, max_samples=22, shard_sequences=6)  # fmt: skip


def _spec(**overrides) -> ExtractionSpec:
    return ExtractionSpec(**{**SPEC, **overrides})


def _ignore(*_args) -> None:
    pass


def _parts_run(model, tok, out: Path, spec: ExtractionSpec, n_parts: int, order=None) -> dict:
    layout = plan_extraction(model, tok, corpus(400), spec, out, n_parts)
    batches: dict[int, int] = {}
    parts = [tuple(p) for p in layout["parts"]]
    for i in order or range(len(parts)):
        run_shards(model, spec, out, parts[i], on_progress=_ignore,
                   on_shard=lambda k, b: batches.__setitem__(k, b),
                   should_cancel=lambda: False)  # fmt: skip
    manifest = finish_extraction(model, tok, spec, out, {})
    return {"manifest": manifest, "batches": batches, "parts": parts}


@pytest.mark.parametrize("n_parts,order", [(1, None), (2, [1, 0]), (3, [2, 0, 1]), (4, None)])
def test_parts_in_any_order_write_what_one_run_writes(tiny, tmp_path, n_parts, order):
    model, tok = tiny("llama")
    run_extraction(model, tok, corpus(400), _spec(), tmp_path / "one", meta={})
    got = _parts_run(model, tok, tmp_path / "parts", _spec(), n_parts, order)
    assert len(got["parts"]) == min(n_parts, 4)  # 22 sequences: shards of 6, 6, 6, 4
    assert_same_output(tmp_path / "one", tmp_path / "parts")
    assert not (tmp_path / "parts" / ".parts").exists()


def test_the_shards_hold_the_reference_residuals(tiny, tmp_path):
    model, tok = tiny("gpt2")
    out = tmp_path / "parts"
    manifest = _parts_run(model, tok, out, _spec(hook_types=["residual"]), 3, [2, 1, 0])["manifest"]
    hook = next(h for h in manifest["hooks"] if h["name"] == "blocks.1.hook_resid_post")
    for shard in hook["shards"]:
        data = load_file(out / shard["file"])
        ref = hidden_states(model, data["token_ids"].long())[2]  # plain transformers
        torch.testing.assert_close(data["activations"], ref, rtol=1e-4, atol=1e-4)


def test_a_batch_size_that_does_not_divide_the_shard_gives_close_activations(tiny, tmp_path):
    model, tok = tiny("llama")
    spec = _spec(batch_size=4)  # shards of 6: the run's second batch straddles shards 0 and 1
    run_extraction(model, tok, corpus(400), spec, tmp_path / "one", meta={})
    _parts_run(model, tok, tmp_path / "parts", spec, 2)
    assert_same_output(tmp_path / "one", tmp_path / "parts", exact=False)


def test_a_killed_part_resumes_at_its_first_unfinished_shard(tiny, tmp_path):
    model, tok = tiny("llama")
    spec, out = _spec(), tmp_path / "parts"
    run_extraction(model, tok, corpus(400), spec, tmp_path / "one", meta={})
    layout = plan_extraction(model, tok, corpus(400), spec, out, 1)
    part = tuple(layout["parts"][0])  # shards 0–3
    seen: list[int] = []

    def die_in_shard_2() -> bool:  # polled before each batch: the 2nd batch of shard 2
        seen.append(1)
        return len(seen) == 6

    with pytest.raises(ExtractionCancelled):
        run_shards(model, spec, out, part, on_progress=_ignore, on_shard=_ignore,
                   should_cancel=die_in_shard_2)  # fmt: skip
    assert [shard_finished(out, k) is not None for k in range(4)] == [True, True, False, False]
    assert not list(out.rglob(".tmp-*.safetensors"))  # the unfinished shard left no file
    altered = out / "shards" / "blocks.0.hook_resid_post" / "000001.safetensors"
    data = altered.read_bytes()
    altered.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # a finished shard altered on disk
    batches: dict[int, int] = {}
    run_shards(model, spec, out, part, on_progress=_ignore, should_cancel=lambda: False,
               on_shard=lambda k, b: batches.__setitem__(k, b))  # fmt: skip
    assert batches == {0: 0, 1: 2, 2: 2, 3: 2}  # shard 1 fails its sha256: recomputed
    finish_extraction(model, tok, spec, out, {})
    assert_same_output(tmp_path / "one", out)


def test_split_shards_covers_every_shard_once():
    for n_shards in range(1, 12):
        for n_parts in range(1, 6):
            parts = split_shards(n_shards, n_parts)
            covered = [k for a, b in parts for k in range(a, b)]
            assert covered == list(range(n_shards))
            sizes = [b - a for a, b in parts]
            assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_merged_states_equal_one_bank_over_all_batches():
    torch.manual_seed(0)
    batches = [torch.randn(2, 5, 8) * (i + 1) + i for i in range(6)]
    one = StatsBank(1)
    for b in batches:
        one.update(b.unsqueeze(0))
    ranges = one.ranges
    states = []
    for chunk in (batches[:1], batches[1:4], batches[4:]):
        bank = StatsBank(1, ranges=ranges)
        for b in chunk:
            bank.update(b.unsqueeze(0))
        states.append(bank.state(0))
    merged = StatsBank.from_state(merge_states(states)).to_dict(0)
    assert_same_stats(one.to_dict(0), merged)
    assert merged["count"] == 6 * 2 * 5 * 8 and math.isfinite(merged["std"])
