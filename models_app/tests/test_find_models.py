"""Finding a model without knowing its exact id: Hub search with the fit per quantization, and
models another tool already put in the local HF cache, added without downloading them again."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from huggingface_hub import snapshot_download

from models_app import services, tasks
from models_app.models import Model, ModelStatus

pytestmark = pytest.mark.django_db(transaction=True)


def test_search_lists_matching_text_models_with_size_gating_and_fit(client, hub):
    r = client.get("/api/models/search", {"q": "llama"})
    assert r.status_code == 200, r.content
    results = {m["id"]: m for m in r.json()["results"]}
    assert {"tiny/llama", "tiny/llama-big", "tiny/gated-llama"} <= set(results)
    assert "tiny/gpt2" not in results
    assert results["tiny/gated-llama"]["gated"] and not results["tiny/llama"]["gated"]
    big = results["tiny/llama-big"]
    assert big["params"] == 10_883_584
    assert [f["quantization"] for f in big["fits"]] == ["FP16", "Q8", "Q4", "Q2"]
    assert big["fits"][0]["bytes"] > big["fits"][3]["bytes"] > 0
    assert all(f["fit"] in ("full", "partial", "too_large") for f in big["fits"])


@pytest.mark.parametrize("query", ["", "   ", "x" * 97, "llama\x00"])
def test_a_bad_search_is_refused_with_a_message(client, hub, query):
    r = client.get("/api/models/search", {"q": query})
    assert r.status_code in (400, 422) and r.json()["detail"]  # a NUL is refused before routing


def test_the_search_box_renders_results_that_fill_the_download_form(client, hub):
    page = client.get("/models/")
    assert b'id="hub-search"' in page.content and b"miUseRepo" in page.content
    r = client.get("/models/search", {"q": "gpt"}, headers={"HX-Request": "true"})
    html = r.content.decode()
    assert r.status_code == 200 and "<html" not in html
    assert 'data-repo="tiny/gpt2"' in html and "miUseRepo(this.dataset.repo)" in html
    empty = client.get("/models/search", {"q": ""}, headers={"HX-Request": "true"})
    assert empty.status_code == 200 and "hub-result" not in empty.content.decode()
    none = client.get("/models/search", {"q": "zzznothing"}, headers={"HX-Request": "true"})
    assert "No text-generation model" in none.content.decode()


def _snapshot(hub, settings, repo: str, **kwargs) -> Path:
    cache = settings.MODELS_CACHE_DIR
    return Path(snapshot_download(repo, endpoint=hub.endpoint, cache_dir=cache, **kwargs))


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_complete_cached_snapshots_are_listed_and_incomplete_ones_are_not(client, hub, settings):
    full = _snapshot(hub, settings, "tiny/llama")
    _snapshot(hub, settings, "tiny/gpt2", allow_patterns=["*.json"])  # no weights: incomplete
    listed = {r["repo_id"]: r for r in client.get("/api/models/cache").json()}
    assert set(listed) == {"tiny/llama"}
    assert listed["tiny/llama"]["commit"] == full.name and listed["tiny/llama"]["added"] == []
    html = client.get("/models/cached", headers={"HX-Request": "true"}).content.decode()
    assert 'data-repo="tiny/llama"' in html and "Add without downloading" in html


def test_a_cached_model_is_added_without_downloading_and_stays_the_other_tools(
    client, hub, settings
):
    theirs = _snapshot(hub, settings, "tiny/llama")
    before = _digest(theirs)
    hub.requests.clear()
    r = client.post(
        "/api/models/add-cached",
        {"hf_repo_id": "tiny/llama", "quantization": "Q4"},
        content_type="application/json",
    )
    assert r.status_code == 201, r.content
    assert r.json()["status"] == "quantizing" and not hub.requests  # not one request to the Hub
    tasks.model_load_check_task(r.json()["id"])
    row = Model.objects.get()
    assert row.status == ModelStatus.READY, row.error_message
    assert row.local_path == str(theirs) and not [f for f in row.files if f["owned"]]
    assert client.get("/api/models/cache").json()[0]["added"] == ["Q4"]
    services.model_delete(row.pk)
    assert _digest(theirs) == before


def test_adding_what_the_cache_does_not_hold_is_refused(client, hub, settings):
    for repo in ("tiny/llama", "not-there/at-all"):
        r = client.post(
            "/api/models/add-cached", {"hf_repo_id": repo}, content_type="application/json"
        )
        assert r.status_code == 404 and "no complete snapshot" in r.json()["detail"]
    assert not Model.objects.exists()
