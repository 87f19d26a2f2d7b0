"""The Python reader: sites, sequences and tokens as torch tensors, shuffling, special tokens,
sha256 checks, DataLoader datasets, and a tiny SAE trained through it in plain torch.

Right values come from the shards read directly with safetensors' own loader, never the reader."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from mistudio.testing.live import ROOT
from models_app.ml.extract import ExtractionSpec, run_extraction
from models_app.ml.reader import ReaderError, open_extraction

from .conftest import corpus

SITES = ["blocks.0.hook_resid_post", "blocks.0.hook_mlp_out", "blocks.2.hook_resid_post"]


@pytest.fixture(scope="module")
def extracted(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("extraction")
    model, tok = tiny("llama")
    spec = ExtractionSpec(layers=[0, 2], hook_types=["residual", "mlp"], context_size=16,
                          batch_size=3, max_samples=11, shard_sequences=4)  # fmt: skip
    run_extraction(model, tok, corpus(300), spec, out, meta={"dataset_id": "d_1"})
    return out


def _direct(out, site: str) -> tuple[torch.Tensor, torch.Tensor]:
    """All of one site's activations [n_seq, T, d] and token ids [n_seq, T], via safetensors."""
    manifest = json.loads((out / "manifest.json").read_text())
    hook = next(h for h in manifest["hooks"] if h["name"] == site)
    parts = [load_file(out / s["file"]) for s in hook["shards"]]
    return torch.cat([p["activations"] for p in parts]), torch.cat([p["token_ids"] for p in parts])


def test_sites_list_name_layer_shape_and_dtype(extracted):
    ext = open_extraction(extracted)
    assert [s.name for s in ext.sites] == [
        "blocks.0.hook_resid_post", "blocks.0.hook_mlp_out",
        "blocks.2.hook_resid_post", "blocks.2.hook_mlp_out",
    ]  # fmt: skip
    site = ext.sites[0]
    assert (site.layer, site.hook_type, site.shape, site.dtype, site.n_shards) == (
        0, "resid_post", (64,), "float32", 3)  # fmt: skip
    assert (ext.n_sequences, ext.context_size, ext.n_tokens) == (11, 16, 176)
    bos = ext.manifest["tokenizer"]["bos_token_id"]
    assert bos is not None and bos in ext.special_token_ids


def test_sequences_in_order_equal_the_shards(extracted):
    ext = open_extraction(extracted)
    batches = list(ext.sequences(SITES, batch_size=3))
    assert [b["token_ids"].shape[0] for b in batches] == [3, 1, 3, 1, 3]  # per shard of 4, 4, 3
    for site in SITES:
        acts, ids = _direct(extracted, site)
        assert torch.equal(torch.cat([b[site] for b in batches]), acts)
        assert torch.equal(torch.cat([b["token_ids"] for b in batches]), ids.long())


def test_shuffled_tokens_are_each_token_once_with_its_own_activations(extracted):
    ext = open_extraction(extracted)
    acts, ids = _direct(extracted, SITES[2])
    batches = list(ext.tokens(SITES, batch_size=50, shuffle=True, seed=3, shuffle_shards=2))
    got = torch.cat([b[SITES[2]] for b in batches])
    assert got.shape == (176, 64) and not torch.equal(got, acts.flatten(0, 1))
    # same multiset of rows, and each row still beside its own token id and other sites' rows
    key = lambda x: x[torch.argsort(x[:, 0])]  # noqa: E731
    assert torch.equal(key(got), key(acts.flatten(0, 1)))
    flat_acts, flat_ids = acts.flatten(0, 1), ids.flatten().long()
    other, _ = _direct(extracted, SITES[0])
    for b in batches:
        rows = zip(b[SITES[2]][:5], b["token_ids"][:5], b[SITES[0]][:5], strict=True)
        for row, tok, row0 in rows:
            i = int(torch.nonzero((flat_acts == row).all(dim=1))[0])
            assert flat_ids[i] == tok and torch.equal(other.flatten(0, 1)[i], row0)
    again = torch.cat([b[SITES[2]] for b in ext.tokens(SITES, batch_size=50, shuffle=True, seed=3)])
    assert torch.equal(got, again)  # a seed gives the same order


def test_exclude_special_tokens_drops_bos_and_eos_positions(extracted):
    ext = open_extraction(extracted)
    _, ids = _direct(extracted, SITES[0])
    special = set(ext.special_token_ids)
    expected = sum(int(i) not in special for i in ids.flatten())
    assert expected < ids.numel()  # BOS at position 0 of every sequence at least
    kept = torch.cat([b["token_ids"] for b in ext.tokens(SITES[0], exclude_special_tokens=True)])
    assert kept.numel() == expected and not set(kept.tolist()) & special


def test_dtype_choice_and_datasets_for_a_dataloader(extracted):
    ext = open_extraction(extracted)
    first = next(ext.tokens(SITES[0], batch_size=7, dtype=torch.bfloat16))
    assert first[SITES[0]].dtype == torch.bfloat16 and first["token_ids"].dtype == torch.int64
    loader = DataLoader(ext.dataset(SITES[0], unit="tokens", batch_size=64), batch_size=32)
    assert sum(b[SITES[0]].shape[0] for b in loader) == 176
    seqs = ext.sequence_dataset(SITES)
    acts, ids = _direct(extracted, SITES[1])
    assert len(seqs) == 11 and torch.equal(seqs[9][SITES[1]], acts[9])
    assert torch.equal(seqs[9]["token_ids"], ids[9].long())
    with pytest.raises(IndexError):
        seqs[11]


def test_missing_or_altered_shards_and_unknown_sites_fail_with_a_message(extracted, tmp_path):
    copy = tmp_path / "x"
    shutil.copytree(extracted, copy)
    ext = open_extraction(copy)
    with pytest.raises(ReaderError, match="no site 'blocks.9.hook_resid_post'"):
        next(ext.tokens("blocks.9.hook_resid_post"))
    shard = ext.manifest["hooks"][1]["shards"][1]["file"]
    data = bytearray((copy / shard).read_bytes())
    data[-1] ^= 0xFF
    (copy / shard).write_bytes(bytes(data))
    assert len(list(ext.tokens(SITES[1]))) == 3  # not verified: read as it is
    with pytest.raises(ReaderError, match=f"{shard}: sha256 does not match"):
        list(ext.tokens(SITES[1], verify=True))
    with pytest.raises(ReaderError, match="sha256"):
        ext.verify()
    (copy / shard).unlink()
    with pytest.raises(ReaderError, match=f"{shard}: missing"):
        list(ext.sequences(SITES[1]))
    with pytest.raises(ReaderError, match="did not complete"):
        open_extraction(tmp_path / "nothing")


def test_a_tiny_sae_trains_through_the_reader_in_plain_torch(extracted):
    """The README's training snippet, in miniature: an L1 SAE on resid_post, loss goes down."""
    ext = open_extraction(extracted)
    site = "blocks.2.hook_resid_post"
    d, n_latents = ext.sites[2].d, 128
    torch.manual_seed(0)
    enc, dec = torch.nn.Linear(d, n_latents), torch.nn.Linear(n_latents, d)
    opt = torch.optim.Adam([*enc.parameters(), *dec.parameters()], lr=3e-3)
    losses = []
    for epoch in range(15):
        for batch in ext.tokens(site, batch_size=64, shuffle=True, seed=epoch,
                                exclude_special_tokens=True):  # fmt: skip
            x = batch[site]  # [n, d]
            z = torch.relu(enc(x))  # [n, n_latents]
            loss = (dec(z) - x).pow(2).sum(-1).mean() + 1e-3 * z.abs().sum(-1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3


def test_the_reader_needs_no_django():
    code = (
        "import sys, models_app.ml.reader; "
        "assert not [m for m in sys.modules if m.split('.')[0] == 'django'], 'django'"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr


def test_per_head_sites_keep_their_shape_and_export_flattened(tiny, tmp_path):
    """hook_z is [n_heads, d_head] per token: the reader gives it so, the SAELens export
    flattens it to n_heads * d_head (how SAELens's hook_z SAEs read it)."""
    datasets = pytest.importorskip("datasets")
    from models_app.ml.export import export_saelens

    model, tok = tiny("llama")
    spec = ExtractionSpec(layers=[1], hook_types=["z"], context_size=8, batch_size=2,
                          max_samples=5, shard_sequences=2)  # fmt: skip
    run_extraction(model, tok, corpus(100), spec, tmp_path / "x", meta={})
    ext = open_extraction(tmp_path / "x")
    site = ext.sites[0]
    heads = model.config.num_attention_heads
    assert site.name == "blocks.1.attn.hook_z" and site.shape == (heads, 64 // heads)
    assert site.d == 64  # the flattened width, not shape[0] (n_heads)
    acts, _ = _direct(tmp_path / "x", site.name)
    got = torch.cat([b[site.name] for b in ext.sequences(site.name, batch_size=2)])
    assert got.shape == (5, 8, heads, 64 // heads) and torch.equal(got, acts)
    tokens = next(ext.tokens(site.name, batch_size=3))[site.name]
    assert tokens.shape == (3, heads, 64 // heads)
    out = export_saelens(tmp_path / "x", tmp_path / "sae")
    ds = datasets.load_from_disk(str(out)).with_format("torch")
    assert ds.features[site.name].shape == (8, 64)
    assert torch.equal(ds[:][site.name], acts.flatten(2))
