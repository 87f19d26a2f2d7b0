"""The on-disk format of architecture.md §5: shards, manifest, atomic writes, verification."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from models_app.ml.extract import ExtractionSpec, run_extraction
from models_app.ml.stats import SiteStats
from models_app.ml.storage import (
    SCHEMA_VERSION,
    NonFiniteError,
    ShardFile,
    ShardWriter,
    StagingPool,
    StorageError,
    read_manifest,
    remove_partial,
    verify,
)

from .conftest import corpus


def test_a_shard_is_written_atomically_with_its_sha256(tmp_path):
    acts = torch.randn(3, 5, 8)  # (n_seq, T, d)
    ids = torch.arange(15, dtype=torch.int32).reshape(3, 5)
    relpath = "shards/blocks.0.hook_resid_post/000000.safetensors"
    shard = ShardFile(tmp_path, relpath, capacity=3, context_size=5, d=8, dtype=torch.float32)
    shard.append(acts)
    record = shard.close(ids)
    path = tmp_path / record["file"]
    assert record["n_seq"] == 3 and record["bytes"] == path.stat().st_size
    assert record["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert [p.name for p in path.parent.iterdir()] == ["000000.safetensors"]  # no temp file left
    back = load_file(path)
    assert torch.equal(back["activations"], acts) and torch.equal(back["token_ids"], ids)


def _writer(tmp_path, shard_sequences: int, dims: dict[str, int]):
    pool = StagingPool(2, {name: (3, 4, d) for name, d in dims.items()}, torch.float32, pin=False)
    stats = {name: SiteStats() for name in dims}
    writer = ShardWriter(tmp_path, dims, 4, shard_sequences, torch.float32, stats, pool.release, 2)
    return pool, writer.start(), stats


def _submit(pool, writer, acts: dict[str, torch.Tensor], ids: torch.Tensor) -> None:
    slot = pool.acquire()
    for name, a in acts.items():
        slot.buffers[name][: a.shape[0]] = a
    slot.n, slot.token_ids = ids.shape[0], ids
    writer.submit(slot)


def test_the_writer_thread_cuts_shards_across_batch_boundaries(tmp_path):
    dims = {"blocks.0.hook_resid_post": 6, "blocks.0.hook_mlp_out": 6}
    pool, writer, stats = _writer(tmp_path, shard_sequences=5, dims=dims)
    data = {name: torch.randn(12, 4, d) for name, d in dims.items()}  # 12 sequences of T=4
    ids = torch.arange(48, dtype=torch.int32).reshape(12, 4)
    for start in range(0, 12, 3):  # batches of 3: shards of 5, 5, 2
        _submit(
            pool, writer, {n: a[start : start + 3] for n, a in data.items()}, ids[start : start + 3]
        )
    records = writer.finish()
    for name in dims:
        assert [r["n_seq"] for r in records[name]] == [5, 5, 2]
        shards = [load_file(tmp_path / r["file"]) for r in records[name]]
        assert torch.equal(torch.cat([s["activations"] for s in shards]), data[name])
        assert torch.equal(torch.cat([s["token_ids"] for s in shards]), ids)


def test_the_writer_refuses_a_batch_whose_statistics_saw_inf_or_nan(tmp_path):
    pool, writer, stats = _writer(tmp_path, shard_sequences=2, dims={"blocks.1.hook_mlp_out": 2})
    bad = torch.ones(3, 4, 2)
    bad[1, 2, 0] = float("inf")
    stats["blocks.1.hook_mlp_out"].update(bad)  # the main thread's job in run_extraction
    _submit(pool, writer, {"blocks.1.hook_mlp_out": bad}, torch.zeros(3, 4, dtype=torch.int32))
    with pytest.raises(NonFiniteError, match="1 inf/NaN values in blocks.1.hook_mlp_out"):
        writer.finish()
    assert not (tmp_path / "shards").exists()


def test_an_error_on_the_writer_thread_reaches_the_caller(tmp_path):
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "blocks.0.hook_resid_post").write_text("a file where a folder goes")
    pool, writer, _ = _writer(tmp_path, shard_sequences=2, dims={"blocks.0.hook_resid_post": 2})
    with pytest.raises(OSError):
        for _ in range(4):
            _submit(pool, writer, {"blocks.0.hook_resid_post": torch.ones(3, 4, 2)},
                    torch.zeros(3, 4, dtype=torch.int32))  # fmt: skip
        writer.finish()


def _extract(tiny, out, **kwargs):
    model, tok = tiny("llama")
    spec = ExtractionSpec(
        layers=[0, 2], hook_types=["residual", "mlp"], context_size=16, batch_size=3,
        max_samples=11, shard_sequences=4,
    )  # fmt: skip
    meta = {"model_id": "m_abc", "repo": "tiny/llama", "commit": "0" * 40, "quantization": "FP16",
            "dataset_id": "d_1", "extraction_id": "e_9"}  # fmt: skip
    return run_extraction(model, tok, corpus(300), spec, out, meta=meta, **kwargs)


def test_the_manifest_and_the_shards_agree(tiny, tmp_path):
    seen: list[bool] = []  # was the manifest there at each progress report?
    manifest = _extract(
        tiny, tmp_path, on_progress=lambda *_: seen.append((tmp_path / "manifest.json").exists())
    )
    assert seen[-1] and not any(seen[:-1])  # written last, just before the final 100%
    assert read_manifest(tmp_path) == json.loads(json.dumps(manifest))
    assert manifest["schema_version"] == SCHEMA_VERSION
    assert manifest["model"] == {
        "id": "m_abc", "repo": "tiny/llama", "revision": None, "commit": "0" * 40,
        "quantization": "FP16",
        "dtype": "float32", "architecture": "llama", "num_layers": 3, "hidden_size": 64,
    }  # fmt: skip
    assert manifest["dataset"] == {"id": "d_1"} and manifest["meta"] == {"extraction_id": "e_9"}
    assert manifest["context_size"] == 16 and manifest["bos_policy"] == "bos_at_position_0"
    assert manifest["n_sequences"] == 11 and manifest["n_tokens"] == 176
    assert [h["name"] for h in manifest["hooks"]] == [
        "blocks.0.hook_resid_post", "blocks.0.hook_mlp_out",
        "blocks.2.hook_resid_post", "blocks.2.hook_mlp_out",
    ]  # fmt: skip
    first_ids = None
    for hook in manifest["hooks"]:
        assert hook["d"] == 64 and hook["dtype"] == "float32"
        assert [s["n_seq"] for s in hook["shards"]] == [4, 4, 3]
        assert hook["statistics"]["n_tokens"] == 176 and hook["statistics"]["nonfinite"] == 0
        for shard in hook["shards"]:
            path = tmp_path / shard["file"]
            assert shard["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
            assert shard["bytes"] == path.stat().st_size
            with safe_open(path, framework="pt") as f:
                assert f.get_slice("activations").get_shape() == [shard["n_seq"], 16, 64]
        ids = torch.cat([load_file(tmp_path / s["file"])["token_ids"] for s in hook["shards"]])
        first_ids = ids if first_ids is None else first_ids
        assert torch.equal(ids, first_ids)  # shard k holds the same sequences for every hook
    assert verify(tmp_path) == []


def test_verify_reports_corrupted_missing_and_misdescribed_shards(tiny, tmp_path):
    manifest = _extract(tiny, tmp_path)
    shards = manifest["hooks"][1]["shards"]
    corrupt = tmp_path / shards[0]["file"]
    data = bytearray(corrupt.read_bytes())
    data[-1] ^= 0xFF
    corrupt.write_bytes(bytes(data))
    (tmp_path / shards[1]["file"]).unlink()
    manifest["hooks"][3]["shards"][2]["n_seq"] = 4  # claims one sequence too many
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    problems = verify(tmp_path)
    assert f"{shards[0]['file']}: sha256 mismatch" in problems
    assert f"{shards[1]['file']}: missing" in problems
    assert any("activations [3, 16, 64] != [4, 16, 64]" in p for p in problems)
    assert any("do not add up" in p for p in problems)


def test_reading_an_unfinished_extraction_says_so(tmp_path):
    with pytest.raises(StorageError, match="did not complete"):
        read_manifest(tmp_path)


def test_remove_partial_deletes_what_an_extraction_wrote_and_nothing_else(tmp_path):
    shard = tmp_path / "run" / "shards" / "blocks.0.hook_resid_post" / "000000.safetensors"
    shard.parent.mkdir(parents=True)
    shard.write_bytes(b"x")
    (tmp_path / "run" / ".tmp-manifest.json").write_text("{")
    remove_partial(tmp_path / "run")
    assert not (tmp_path / "run").exists()
    shard.parent.mkdir(parents=True)
    (tmp_path / "run" / "notes.txt").write_text("the user's file")
    remove_partial(tmp_path / "run")
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["notes.txt"]


def test_hooks_of_one_width_share_a_stacked_staging_buffer():
    shapes = {"a": (2, 3, 4), "z": (2, 3, 2, 2), "b": (2, 3, 4), "wide": (2, 3, 6)}  # (B, T, …)
    slot = StagingPool(1, shapes, torch.float32, pin=False).acquire()
    assert list(slot.buffers) == list(shapes)  # the caller's order
    assert {w: tuple(s.shape) for w, s in slot.stacks.items()} == {4: (3, 2, 3, 4), 6: (1, 2, 3, 6)}
    for i, name in enumerate(shapes):
        slot.buffers[name].fill_(i)
        assert tuple(slot.buffers[name].shape) == shapes[name]
    # a, z (2 × 2 = 4 wide) and b stacked in order; each a view of its stack
    assert [int(slot.stacks[4][i, 0, 0, 0]) for i in range(3)] == [0, 1, 2]
    assert int(slot.stacks[6].min()) == int(slot.stacks[6].max()) == 3
