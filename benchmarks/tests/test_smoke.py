"""The extraction benchmark on a tiny GPT-2: it runs, reports every key, and every method writes
the same activations. No timing is asserted: benchmarks never fail a build for speed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import GPT2Config

from benchmarks import cli_start, extraction, memory, peers
from benchmarks.workload import ALL_HOOKS, build_model_dir, make_workload
from mistudio.testing.tiny_models import VOCAB_SIZE
from models_app.ml.loading import load_model

REQUIRED_KEYS = {
    "bare_forward_tok_s", "ours_tok_s", "ours_all_hooks_tok_s", "transformer_lens_tok_s",
    "nnsight_tok_s", "seed_style_tok_s", "peak_rss_mb_small", "peak_rss_mb_large", "device",
    "ours_every_site_tok_s", "bare_every_site_tok_s", "sae_lens_cache_tok_s", "cli_first_batch_s",
}  # fmt: skip
LAYERS = [0, 2]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    config = GPT2Config(n_layer=3, n_embd=64, n_head=4, n_positions=64, vocab_size=VOCAB_SIZE)
    return build_model_dir(tmp_path_factory.mktemp("bench") / "tiny-gpt2", config)


def _config(model_dir: Path, **kw) -> extraction.BenchConfig:
    return extraction.BenchConfig(
        layers=LAYERS, n_sequences=4, every_site_sequences=6, context_size=32, batch_size=2,
        repeats=1, memory_sequences=2, memory_seed_style=False, model_dir=model_dir, **kw,
    )  # fmt: skip


def test_it_reports_every_key_as_one_json_object(tiny_dir):
    result = extraction.run_benchmark(_config(tiny_dir), cli_runs=False)

    assert result.keys() >= REQUIRED_KEYS
    assert json.loads(json.dumps(result)) == result
    for key in ("bare_forward_tok_s", "ours_tok_s", "ours_all_hooks_tok_s", "seed_style_tok_s",
                "ours_every_site_tok_s", "bare_every_site_tok_s"):  # fmt: skip
        assert result[key] > 0
    assert result["ratios"]["ours_every_site_vs_bare"] > 0
    assert result["vs_bare"]["ours_every_site"] == result["ratios"]["ours_every_site_vs_bare"]
    sequences = result["sequences"]  # the every-site workload has its own N, on both sides
    assert sequences["ours_every_site"] == sequences["bare_every_site"] == 6
    assert sequences["ours"] == sequences["bare_forward"] == sequences["ours_all_hooks"] == 4
    assert set(result["peak_rss_growth_by_hooks"]) == {"residual", "all", "every"}
    assert result["cli_first_batch_s"] is None  # not asked for
    assert "end_to_end_disk_tok_s" not in result  # a GPU key
    assert result["peak_rss_mb_small"] > 0 and result["peak_rss_mb_large"] > 0
    assert result["device"] == "cpu"
    assert "transformers" in result["machine"]
    versions = peers.available()
    for lib, version in versions.items():
        key = "sae_lens_cache_tok_s" if lib == "sae_lens" else f"{lib}_tok_s"
        runs = version is not None and (lib == "nnsight" or versions["transformer_lens"])
        assert (result[key] is None) == (not runs)
    assert extraction.table(result).startswith("method")


def test_without_the_peer_libraries_their_keys_are_null_with_a_note(tiny_dir, monkeypatch):
    for lib in ("transformer_lens", "nnsight", "sae_lens"):
        monkeypatch.setitem(sys.modules, lib, None)  # `import lib` now raises ImportError

    result = extraction.run_benchmark(_config(tiny_dir), memory_runs=False, cli_runs=False)

    assert result["transformer_lens_tok_s"] is None and result["nnsight_tok_s"] is None
    assert result["sae_lens_cache_tok_s"] is None
    assert result["ratios"]["ours_vs_nnsight"] is None
    assert result["ours_tok_s"] > 0 and result["ratios"]["ours_vs_bare"] > 0
    assert any("nnsight is not installed" in note for note in result["notes"])
    assert result["peak_rss_mb_small"] is None


def _shards(out_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    paths = sorted(out_dir.glob("shards/*/000000.safetensors"))
    return {p.parent.name: load_file(p) for p in paths}


def test_every_method_writes_the_same_activations(tiny_dir, tmp_path):
    work = make_workload(tiny_dir, n_sequences=4, context_size=32, batch_size=2)
    model, _ = load_model(tiny_dir, "FP16", CPU)
    cfg = _config(tiny_dir)
    extraction.ours(model, extraction.load_tokenizer(tiny_dir), LAYERS, ALL_HOOKS)(
        work, tmp_path / "ours"
    )
    runners = extraction.seed_methods(model, cfg, torch.float32)
    for lib, version in peers.available().items():
        if version is not None and lib != "sae_lens":  # its own format: tested below
            runners |= extraction.peer(lib, tiny_dir, cfg, CPU, torch.float32)
    runners = {k: v for k, v in runners.items() if k.endswith("_all_hooks")}
    reference = _shards(tmp_path / "ours")
    assert len(reference) == len(LAYERS) * 3
    for name, runner in runners.items():
        runner(work, tmp_path / name)
        got = _shards(tmp_path / name)
        assert got.keys() == reference.keys(), name
        for site, tensors in reference.items():
            assert torch.equal(got[site]["token_ids"], tensors["token_ids"]), (name, site)
            assert got[site]["activations"].dtype == tensors["activations"].dtype
            torch.testing.assert_close(got[site]["activations"], tensors["activations"])


def test_sae_lens_caches_the_same_activations_as_ours(tiny_dir, tmp_path):
    if not (peers.available()["sae_lens"] and peers.available()["transformer_lens"]):
        pytest.skip("sae-lens and transformer-lens are not installed")
    from datasets import Dataset

    work = make_workload(tiny_dir, n_sequences=4, context_size=32, batch_size=2)
    model, _ = load_model(tiny_dir, "FP16", CPU)
    extraction.ours(model, extraction.load_tokenizer(tiny_dir), LAYERS, ALL_HOOKS)(
        work, tmp_path / "ours"
    )
    runner = extraction.peer("sae_lens", tiny_dir, _config(tiny_dir), CPU, torch.float32)
    assert set(runner) == {"sae_lens_cache", "sae_lens_cache_all_hooks"}
    assert runner["sae_lens_cache_all_hooks"](work, tmp_path / "sae") == work.n_tokens
    one = work.head(1)  # fewer sequences than a batch (the warm-up's case)
    assert runner["sae_lens_cache"](one, tmp_path / "one") == one.n_tokens
    for site, tensors in _shards(tmp_path / "ours").items():
        cached = Dataset.load_from_disk(str(tmp_path / "sae" / site))[:]  # {column: lists}
        assert torch.equal(torch.tensor(cached["token_ids"]), tensors["token_ids"]), site
        torch.testing.assert_close(torch.tensor(cached[site]), tensors["activations"])


def test_the_cli_first_batch_is_timed(tmp_path, monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")  # as the benchmark sets it for itself
    result = cli_start.measure(tmp_path, runs=1)

    assert 0 < result["first_batch_s"] <= result["total_s"][0]


def test_only_the_extraction_bar_marks_the_first_batch():
    # the dataset import's bar comes first and reaches 100/100 before any token is extracted
    assert not cli_start._work_done(b"dataset d_1: 100%|####| 100/100 [00:00<00:00, 9%/s]")
    assert not cli_start._work_done(b"extract x_1: 0.00tok [00:00, ?tok/s]")
    assert not cli_start._work_done(b"extract x_1:   0%|   | 0.00/4.10k [00:00<?, ?tok/s]")
    assert cli_start._work_done(b"extract x_1:  12%|#  | 512/4.10k [00:01<00:07, 480tok/s]")


def test_peak_rss_comes_from_a_fresh_process(tiny_dir):
    result = memory.peak_rss(tiny_dir, 2, layers=LAYERS, context_size=32, batch_size=2,
                             method="seed_style")  # fmt: skip

    assert result["method"] == "seed_style" and result["n_sequences"] == 2
    assert result["peak_rss_mb"] >= result["rss_before_mb"] > 0
