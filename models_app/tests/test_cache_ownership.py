"""The Hugging Face cache is shared with other tools: deleting or cancelling a model removes only
the files we fetched, never another tool's snapshot (made here with plain huggingface_hub)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from huggingface_hub import snapshot_download
from transformers import AutoModelForCausalLM

from mistudio.testing.tiny_models import build_catalogue
from models_app import services, tasks
from models_app.models import Model, ModelStatus
from models_app.repo import repo_cache_dir

from .helpers import cache_files, download, in_thread, wait_for

pytestmark = pytest.mark.django_db(transaction=True)


def _other_tool(hub, settings, repo: str, **kwargs) -> Path:
    """Another tool's copy of `repo` in the same cache: every file, README and ONNX included."""
    return Path(
        snapshot_download(
            repo, endpoint=hub.endpoint, cache_dir=settings.MODELS_CACHE_DIR, **kwargs
        )
    )


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_another_tools_snapshot_survives_our_download_and_delete(hub, settings):
    theirs = _other_tool(hub, settings, "tiny/llama")
    before = _digest(theirs)
    assert "README.md" in before and "onnx/model.onnx" in before
    row = download("tiny/llama", "Q4")
    assert row.status == ModelStatus.READY, row.error_message
    assert not [f for f in row.files if f["owned"]]  # everything was there already
    services.model_delete(row.pk)
    assert _digest(theirs) == before
    AutoModelForCausalLM.from_pretrained(theirs)  # still loads


def test_our_cancel_leaves_another_tools_files_and_removes_only_our_partial_blob(hub, settings):
    theirs = _other_tool(hub, settings, "tiny/llama-big", allow_patterns=["*.json", "*.md"])
    before = _digest(theirs)
    hub.set_rate(2_000_000)
    row = services.model_download(hf_repo_id="tiny/llama-big", quantization="Q4")
    worker = in_thread(tasks.model_download_task, row.pk)
    wait_for(lambda: Model.objects.get(pk=row.pk).progress > 5)
    services.model_cancel(row.pk)
    worker.join(timeout=300)
    assert Model.objects.get(pk=row.pk).status == ModelStatus.CANCELLED
    assert _digest(theirs) == before
    root = repo_cache_dir(settings.MODELS_CACHE_DIR, "tiny/llama-big")
    assert not list(root.glob("blobs/*.incomplete"))
    assert not [f for f in cache_files(settings) if f.endswith("model.safetensors")]


def test_a_queued_cancel_removes_nothing_another_tool_holds(hub, settings):
    theirs = _other_tool(hub, settings, "tiny/gpt2")
    before = _digest(theirs)
    row = services.model_download(hf_repo_id="tiny/gpt2", quantization="Q8")
    services.model_cancel(row.pk)
    assert _digest(theirs) == before


def test_blobs_another_snapshot_links_stay_when_we_delete_ours(hub, settings):
    """Another tool holds an older commit of a repo; our newer commit shares its weights."""
    files = {p.name: p.read_bytes() for p in build_catalogue()["tiny/gpt2"].iterdir()}
    hub.add_repo("own/gpt2-two-commits", {**files, "README.md": b"# first\n"})
    old = _other_tool(hub, settings, "own/gpt2-two-commits")
    before = _digest(old)
    hub.add_repo("own/gpt2-two-commits", {**files, "README.md": b"# a card-only change\n"})
    row = download("own/gpt2-two-commits", "FP16")
    assert row.status == ModelStatus.READY and row.commit_sha != old.name
    assert [f for f in row.files if f["owned"]]  # a new snapshot: its entries are ours
    services.model_delete(row.pk)
    assert _digest(old) == before
    root = repo_cache_dir(settings.MODELS_CACHE_DIR, "own/gpt2-two-commits")
    assert not (root / "snapshots" / row.commit_sha).exists()


def test_a_second_quantization_of_ours_keeps_the_files_and_takes_them_over(hub, settings):
    q8, q4 = download("tiny/gpt2", "Q8"), download("tiny/gpt2", "Q4")
    assert [f for f in q8.files if f["owned"]] and not [f for f in q4.files if f["owned"]]
    services.model_delete(q8.pk)
    q4.refresh_from_db()
    assert [f for f in q4.files if f["owned"]]
    assert [f for f in cache_files(settings) if f.endswith("model.safetensors")]
    services.model_delete(q4.pk)
    assert not [f for f in cache_files(settings) if "models--tiny--gpt2" in f]
