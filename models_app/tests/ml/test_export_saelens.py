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
    from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner, LoggingConfig
    from sae_lens.saes.standard_sae import StandardTrainingSAEConfig
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    # Offline stand-ins SAELens's API requires: a model (its evaluator's) and a tokenized dataset.
    tl_model = HookedTransformer(HookedTransformerConfig(
        n_layers=2, d_model=64, n_ctx=16, d_head=16, n_heads=4, d_vocab=384, act_fn="gelu",
    ))  # fmt: skip
    tokens = datasets.Dataset.from_dict({"tokens": [[1] * 16] * 4})
    cfg = LanguageModelSAERunnerConfig(
        sae=StandardTrainingSAEConfig(d_in=64, d_sae=128),
        model_name="stand-in", hook_name=SITE, dataset_path="", context_size=16,
        use_cached_activations=True, cached_activations_path=str(out),
        training_tokens=640, train_batch_size_tokens=64, store_batch_size_prompts=4,
        n_batches_in_buffer=8, device="cpu", dtype="float32", n_eval_batches=0,
        n_checkpoints=0, save_final_checkpoint=False, output_path=str(tmp_path / "run"),
        checkpoint_path=str(tmp_path / "ckpt"), lr=1e-3, logger=LoggingConfig(log_to_wandb=False),
    )  # fmt: skip
    runner = LanguageModelSAETrainingRunner(cfg, override_dataset=tokens, override_model=tl_model)
    assert runner.activations_store.cached_activation_dataset is not None
    before = [p.detach().clone() for p in runner.sae.parameters()]
    sae = runner.run()
    assert any(
        not torch.equal(a, b.detach()) for a, b in zip(before, sae.parameters(), strict=True)
    )
    # the trained SAE reads our activations: its reconstruction beats a zero guess on them
    acts, _ = _direct(extracted, SITE)
    x = acts.flatten(0, 1)
    with torch.no_grad():
        err = (sae(x) - x).pow(2).sum(-1).mean()
    assert err < x.pow(2).sum(-1).mean()
