"""SAELens-ready export: a `datasets` folder SAELens trains from with use_cached_activations=True.

SAELens itself is the judge: its LanguageModelSAETrainingRunner reads the folder and trains for a
few steps (offline, so its model and text dataset are tiny stand-ins it never reads activations
from: every activation comes from the cache). Values are compared with the shards read directly
with safetensors."""

from __future__ import annotations

import json
import shutil

import datasets
import pytest
import torch
from safetensors.torch import load_file

from models_app.ml.export import ExportError, export_saelens
from models_app.ml.extract import ExtractionSpec, run_extraction
from models_app.ml.reader import ReaderError

from ..saelens import saelens_train
from .conftest import corpus

sae_lens = pytest.importorskip("sae_lens")  # the test extra installs it: this runs in CI
transformer_lens = pytest.importorskip("transformer_lens")

SITE = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def extracted(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("extraction") / "x"
    model, tok = tiny("gpt2")
    spec = ExtractionSpec(layers=[0, 1], hook_types=["residual", "mlp"], context_size=16,
                          batch_size=4, max_samples=40, shard_sequences=6)  # fmt: skip
    run_extraction(model, tok, corpus(400), spec, out, meta={})
    return out


def _direct(out, site):
    manifest = json.loads((out / "manifest.json").read_text())
    hook = next(h for h in manifest["hooks"] if h["name"] == site)
    parts = [load_file(out / s["file"]) for s in hook["shards"]]
    return torch.cat([p["activations"] for p in parts]), torch.cat([p["token_ids"] for p in parts])


def test_the_export_holds_one_column_per_hook_and_token_ids_equal_to_the_shards(
    extracted, tmp_path
):
    seen = []
    out = export_saelens(extracted, tmp_path / "sae", on_progress=lambda d, t: seen.append((d, t)))
    ds = datasets.load_from_disk(str(out))
    assert set(ds.column_names) == {
        "blocks.0.hook_resid_post", "blocks.0.hook_mlp_out", "blocks.1.hook_resid_post",
        "blocks.1.hook_mlp_out", "token_ids",
    }  # fmt: skip
    assert ds.features[SITE].shape == (16, 64) and len(ds) == 40
    ds.set_format("torch")
    acts, ids = _direct(extracted, SITE)
    assert torch.equal(ds[:][SITE], acts) and torch.equal(ds[:]["token_ids"], ids)
    assert seen[-1] == (40, 40)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".export-")]  # work files gone


def test_bad_requests_leave_nothing(extracted, tmp_path):
    tmp_path = tmp_path / "exports"
    with pytest.raises(ExportError, match="no site 'blocks.7.hook_resid_post'"):
        export_saelens(extracted, tmp_path / "a", sites=["blocks.7.hook_resid_post"])
    with pytest.raises(ExportError, match="dtype"):
        export_saelens(extracted, tmp_path / "b", dtype="int8")
    (tmp_path / "c").mkdir(parents=True)
    with pytest.raises(ExportError, match="already exists"):
        export_saelens(extracted, tmp_path / "c")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_an_altered_shard_stops_the_export_and_leaves_nothing(extracted, tmp_path):
    tmp_path = tmp_path / "exports"
    copy = tmp_path / "x"
    shutil.copytree(extracted, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    shard = copy / manifest["hooks"][2]["shards"][3]["file"]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ReaderError, match="sha256"):
        export_saelens(copy, tmp_path / "sae")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]


def test_saelens_trains_from_the_exported_folder(extracted, tmp_path):
    out = export_saelens(extracted, tmp_path / "sae", sites=[SITE])
    sae = saelens_train(out, SITE, d_in=64, context_size=16, work=tmp_path)
    # the trained SAE reads our activations: its reconstruction beats a zero guess on them
    acts, _ = _direct(extracted, SITE)
    x = acts.flatten(0, 1)
    with torch.no_grad():
        err = (sae(x) - x).pow(2).sum(-1).mean()
    assert err < x.pow(2).sum(-1).mean()
