"""The reader under a DataLoader with workers (every token once, whatever num_workers) and on
corrupted folders (ReaderError naming the file, never a raw safetensors/JSON/KeyError).

Right values come from the shards read directly with safetensors' own loader, never the reader."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from models_app.ml.extract import ExtractionSpec, run_extraction
from models_app.ml.reader import ReaderError, open_extraction

from .conftest import corpus

SITE = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def extracted(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("extraction")  # 4 shards of 3, 3, 3 and 2 sequences
    model, tok = tiny("llama")
    spec = ExtractionSpec(layers=[0], hook_types=["residual"], context_size=8, batch_size=4,
                          max_samples=11, shard_sequences=3)  # fmt: skip
    run_extraction(model, tok, corpus(300), spec, out, meta={"dataset_id": "d_1"})
    return out


def _direct_rows(out) -> torch.Tensor:
    """Every stored token as a row [token_id, *acts], sorted (a multiset), via safetensors."""
    hook = json.loads((out / "manifest.json").read_text())["hooks"][0]
    parts = [load_file(out / s["file"]) for s in hook["shards"]]
    acts = torch.cat([p["activations"] for p in parts]).flatten(0, 1).float()
    ids = torch.cat([p["token_ids"] for p in parts]).flatten().float()
    return _sorted(torch.cat([ids[:, None], acts], dim=1))


def _sorted(rows: torch.Tensor) -> torch.Tensor:
    return torch.stack(sorted(rows, key=lambda r: r.tolist()))


def _rows(loader: DataLoader) -> torch.Tensor:
    batches = [torch.cat([b["token_ids"].float().reshape(-1, 1),
                          b[SITE].float().reshape(-1, b[SITE].shape[-1])], dim=1)
               for b in loader]  # fmt: skip
    return torch.cat(batches)


@pytest.mark.parametrize("shuffle", [False, True])
def test_a_dataloader_with_workers_yields_every_token_exactly_once(extracted, shuffle):
    ext = open_extraction(extracted)
    want = _direct_rows(extracted)
    assert want.shape[0] == 11 * 8
    runs = {}
    for workers in (0, 2, 3):
        data = ext.dataset(SITE, batch_size=5, shuffle=shuffle, seed=7, shuffle_shards=2)
        runs[workers] = _rows(DataLoader(data, batch_size=16, num_workers=workers))
        assert runs[workers].shape == want.shape, workers
        torch.testing.assert_close(_sorted(runs[workers]), want, atol=0, rtol=0)
    again = ext.dataset(SITE, batch_size=5, shuffle=shuffle, seed=7, shuffle_shards=2)
    same = _rows(DataLoader(again, batch_size=16, num_workers=2))
    assert torch.equal(same, runs[2])  # shuffling stays deterministic for a seed
    seqs = ext.dataset(SITE, unit="sequences", batch_size=2, shuffle=shuffle)
    got = _rows(DataLoader(seqs, batch_size=4, num_workers=3))
    torch.testing.assert_close(_sorted(got), want, atol=0, rtol=0)


def _corrupt(folder, how: str) -> str:
    """Damage a copy of an extraction; return a piece of the message it must give."""
    manifest = folder / "manifest.json"
    shard = json.loads(manifest.read_text())["hooks"][0]["shards"][0]["file"]
    if how == "truncated shard":
        (folder / shard).write_bytes((folder / shard).read_bytes()[:500])
        return shard
    if how == "missing shard":
        (folder / shard).unlink()
        return shard
    texts = {"empty manifest": "{}", "list manifest": "[]", "not json": "{not json",
             "no hooks key": '{"context_size": 8}'}  # fmt: skip
    manifest.write_text(texts[how])
    return "manifest.json"


CORRUPTIONS = ["truncated shard", "missing shard", "empty manifest", "list manifest", "not json",
               "no hooks key"]  # fmt: skip


@pytest.mark.parametrize("how", CORRUPTIONS)
def test_a_corrupted_folder_raises_reader_error_naming_the_file(extracted, tmp_path, how):
    copy = tmp_path / "x"
    shutil.copytree(extracted, copy)
    names = _corrupt(copy, how)
    with pytest.raises(ReaderError, match=names.replace(".", r"\.")):
        ext = open_extraction(copy)
        list(ext.sequences())
    if "shard" in how:
        with pytest.raises(ReaderError, match=names):
            open_extraction(copy, verify=True)
        with pytest.raises(ReaderError, match=names):
            open_extraction(copy).sequence_dataset()[0]


def test_wrong_types_in_the_manifest_are_named(extracted, tmp_path):
    copy = tmp_path / "x"
    shutil.copytree(extracted, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["hooks"][0]["shards"][0]["n_seq"] = "three"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ReaderError, match=r"hooks\[0\]\.shards\[0\]: 'n_seq' should be int"):
        open_extraction(copy)
