"""Download jobs against the loopback fake hub: real files, real quantized loads."""

from __future__ import annotations

import pytest
from bitsandbytes.nn import Linear4bit, Linear8bitLt
from django.urls import reverse
from optimum.quanto import QLinear

from conftest import GOOD_TOKEN
from mistudio.errors import Conflict
from mistudio.hub import HubError
from mistudio.testing.tiny_models import build_tiny_model
from models_app import resident, services, tasks
from models_app.jobs import LOAD_QUEUED, UNLOAD_QUEUED
from models_app.ml.layers import find_blocks
from models_app.models import HubCredential, Model, ModelStatus

from .helpers import cache_files, cancel_when_asked, download, in_thread, wait_for

pytestmark = pytest.mark.django_db(transaction=True)

QUANTIZED_LAYER = {"Q8": Linear8bitLt, "Q4": Linear4bit, "Q2": QLinear}


@pytest.mark.parametrize("quantization", ["FP16", "Q8", "Q4", "Q2"])
def test_it_downloads_and_really_quantizes(hub, quantization):
    row = download("tiny/llama", quantization)
    assert row.status == ModelStatus.READY, row.error_message
    assert (row.progress, row.is_loaded) == (100.0, True)
    assert (row.num_layers, row.hidden_dim, row.num_heads, row.vocab_size) == (2, 128, 4, 384)
    assert row.max_position == 256 and row.architecture == "LlamaForCausalLM"
    model, report = resident.model_resident(row.pk)
    kinds = {type(m) for m in model.modules()}
    if quantization == "FP16":
        assert row.dtype == "float32" and not kinds & set(QUANTIZED_LAYER.values())
    else:
        assert QUANTIZED_LAYER[quantization] in kinds
        assert report.quantized_layers == 14  # 2 blocks × (4 attention + 3 MLP projections)
    assert row.mem_req_bytes == report.footprint_bytes > 0


def test_q2_really_quantizes_gpt2_conv1d_layers(hub):
    row = download("tiny/gpt2", "Q2")
    assert row.status == ModelStatus.READY, row.error_message
    model, report = resident.model_resident(row.pk)
    _, blocks = find_blocks(model)
    assert all(isinstance(m, QLinear) for m in (blocks[0].attn.c_attn, blocks[0].mlp.c_fc))
    fp16 = download("tiny/gpt2", "FP16")
    assert row.mem_req_bytes < fp16.mem_req_bytes


def test_footprint_shrinks_with_quantization(hub):
    sizes = {q: download("tiny/llama-big", q).mem_req_bytes for q in ("FP16", "Q8", "Q4", "Q2")}
    assert sizes["FP16"] > sizes["Q8"] > sizes["Q4"] > sizes["Q2"] > 0


def test_it_fetches_only_safetensors_config_and_tokenizer(hub, settings):
    row = download("tiny/llama")
    names = {f["name"] for f in row.files}
    assert "model.safetensors" in names and "config.json" in names and "tokenizer.json" in names
    files = cache_files(settings)
    assert not [f for f in files if f.endswith((".bin", ".onnx", "README.md", ".gitattributes"))]


def test_progress_is_monotonic_and_ends_at_100(hub):
    hub.set_rate(15_000_000)  # ~22 MB: about 1.5 s, many progress writes
    row = services.model_download(hf_repo_id="tiny/llama-big", quantization="Q4")
    worker = in_thread(tasks.model_download_task, row.pk)
    seen = []
    while worker.is_alive():
        r = Model.objects.get(pk=row.pk)
        if r.status == ModelStatus.DOWNLOADING:
            seen.append((r.progress, r.bytes_done))
    worker.join()
    final = Model.objects.get(pk=row.pk)
    assert final.status == ModelStatus.QUANTIZING, final.error_message
    assert len({p for p, _ in seen}) > 5, "progress should move in many steps"
    assert seen == sorted(seen), "progress and bytes never go back"
    assert final.bytes_done == final.bytes_total == row.bytes_total
    tasks.model_load_check_task(row.pk)
    assert Model.objects.get(pk=row.pk).progress == 100.0


def test_cancel_mid_download_leaves_no_partial_files(hub, settings):
    hub.set_rate(2_000_000)
    row = services.model_download(hf_repo_id="tiny/llama-big", quantization="Q4")
    worker = in_thread(tasks.model_download_task, row.pk)
    wait_for(lambda: Model.objects.get(pk=row.pk).progress > 5)
    services.model_cancel(row.pk)
    worker.join(timeout=300)
    row.refresh_from_db()
    assert row.status == ModelStatus.CANCELLED
    assert not [f for f in cache_files(settings) if "blobs" in f or "snapshots" in f]


@pytest.fixture(scope="module")
def one_chunk_repo(fake_hub, tmp_path_factory) -> str:
    """A Llama so small (1 layer, hidden 16: ~60 KB of weights) that every file is one chunk."""
    folder = build_tiny_model("llama", tmp_path_factory.mktemp("mini"), layers=1, hidden=16)
    fake_hub.add_repo("tiny/llama-one-chunk", folder)
    return "tiny/llama-one-chunk"


@pytest.mark.parametrize("repo", ["one chunk", "tiny/gpt2", "shapes/sharded-consolidated"])
@pytest.mark.parametrize("at", ["first file", "last file"])
def test_a_cancel_as_a_file_is_asked_for_ends_the_job_cancelled(
    hub, settings, shapes, one_chunk_repo, repo, at
):
    """The cancel lands as a file's body is asked for. A file of one chunk then arrives with no
    poll seeing the flag; after the last file the job used to hand over to the load check,
    which never claims a cancelled row: the row waited for ever. Wherever the cancel lands, the
    job ends cancelled, no file of ours stays in the cache, and a late load check does nothing."""
    repo = one_chunk_repo if repo == "one chunk" else repo
    row = services.model_download(hf_repo_id=repo, quantization="FP16")
    fetched = sorted((f for f in row.files if f["name"] != "config.json"), key=lambda f: f["size"])
    name = fetched[0 if at == "first file" else -1]["name"]  # (smallest first; config: cached)
    asked = cancel_when_asked(hub, name, row.pk)
    tasks.model_download_task(row.pk)
    assert asked == [name]
    row.refresh_from_db()
    assert (row.status, row.error_message) == (ModelStatus.CANCELLED, "Cancelled by the user.")
    tasks.model_load_check_task(row.pk)  # delivered anyway: finds nothing to do
    assert Model.objects.get(pk=row.pk).status == ModelStatus.CANCELLED
    assert not [f for f in cache_files(settings) if "blobs" in f or "snapshots" in f]


def test_cancel_before_the_worker_starts_ends_at_once(hub):
    row = services.model_download(hf_repo_id="tiny/gpt2", quantization="Q8")
    services.model_cancel(row.pk)
    tasks.model_download_task(row.pk)  # delivered after the cancel: does nothing
    assert Model.objects.get(pk=row.pk).status == ModelStatus.CANCELLED
    with pytest.raises(Conflict):
        services.model_cancel(row.pk)


@pytest.mark.parametrize(
    ("repo", "token", "status", "words"),
    [
        ("tiny/gated-llama", None, 403, "accept the licence at"),
        ("tiny/llama", "hf_notavalidtoken000", 401, "token is invalid"),
        ("tiny/missing", None, 404, "not found"),
        ("tiny/pickle-only", None, 422, "pickle"),
    ],
)
def test_hub_refusals_give_clear_messages_and_change_nothing(hub, repo, token, status, words):
    with pytest.raises(HubError) as err:
        services.model_download(hf_repo_id=repo, quantization="Q4", access_token=token)
    assert err.value.status == status and words in err.value.message
    assert Model.objects.count() == 0


def test_gated_repo_downloads_with_an_approved_token(hub):
    row = download("tiny/gated-llama", "Q4", token=GOOD_TOKEN)
    assert row.status == ModelStatus.READY, row.error_message
    assert not HubCredential.objects.exists()  # the token is gone once the download ends


def test_same_repo_and_quantization_twice_is_a_conflict(hub):
    download("tiny/gpt2", "Q8")
    with pytest.raises(Conflict):
        services.model_download(hf_repo_id="tiny/gpt2", quantization="Q8")
    assert download("tiny/gpt2", "Q4").status == ModelStatus.READY  # another quantization is fine


def test_failed_download_can_be_retried(hub):
    row = services.model_download(hf_repo_id="tiny/gpt2", quantization="Q8")
    services.model_cancel(row.pk)
    assert download("tiny/gpt2", "Q8").status == ModelStatus.READY


def test_delete_removes_the_files(hub, settings):
    row = download("tiny/gpt2", "Q8")
    assert cache_files(settings)
    services.model_delete(row.pk)
    assert not Model.objects.exists()
    assert not [f for f in cache_files(settings) if "models--tiny--gpt2" in f]


def test_delete_keeps_files_another_quantization_uses(hub, settings):
    q8, q4 = download("tiny/gpt2", "Q8"), download("tiny/gpt2", "Q4")
    services.model_delete(q8.pk)
    assert [f for f in cache_files(settings) if f.endswith("model.safetensors")]
    services.model_delete(q4.pk)
    assert not [f for f in cache_files(settings) if "models--tiny--gpt2" in f]


def test_delete_is_refused_while_downloading(hub):
    row = services.model_download(hf_repo_id="tiny/gpt2", quantization="Q8")
    with pytest.raises(Conflict):
        services.model_delete(row.pk)


def test_a_full_disk_is_refused_before_any_byte(hub, settings):
    settings.DISK_MARGIN_BYTES = 10**18
    with pytest.raises(HubError) as err:
        services.model_download(hf_repo_id="tiny/gpt2", quantization="Q8")
    assert err.value.code == "disk_full" and Model.objects.count() == 0


def test_second_delivery_of_a_download_does_nothing(hub):
    row = services.model_download(hf_repo_id="tiny/gpt2", quantization="FP16")
    tasks.model_download_task(row.pk)
    attempts = Model.objects.get(pk=row.pk).attempt
    tasks.model_download_task(row.pk)
    assert Model.objects.get(pk=row.pk).attempt == attempts


def test_loading_a_second_model_evicts_the_first(hub):
    a, b = download("tiny/gpt2", "FP16"), download("tiny/llama", "FP16")
    a.refresh_from_db()
    assert (a.is_loaded, b.is_loaded) == (False, True)
    tasks.model_unload_task(b.pk)
    assert not Model.objects.get(pk=b.pk).is_loaded


def test_load_and_unload_delivered_twice_or_after_a_delete_are_no_ops(hub):
    row = download("tiny/gpt2", "FP16")
    tasks.model_unload_task(row.pk)
    for _ in range(2):
        tasks.model_load_task(row.pk)
    assert Model.objects.get(pk=row.pk).is_loaded
    for _ in range(2):
        tasks.model_unload_task(row.pk)
    assert not Model.objects.get(pk=row.pk).is_loaded
    services.model_delete(row.pk)
    tasks.model_load_task(row.pk)  # the worker got it after the delete: skipped, no exception
    tasks.model_unload_task(row.pk)
    assert not Model.objects.filter(pk=row.pk).exists()


@pytest.mark.parametrize("repo_id", ["tiny/gpt2", "tiny/llama"])
def test_load_and_unload_say_what_happens_until_the_worker_is_done(client, hub, repo_id):
    row = download(repo_id, "FP16")
    tasks.model_unload_task(row.pk)
    card = client.post(reverse("models:load", args=[row.pk]), HTTP_HX_REQUEST="true")
    assert Model.objects.get(pk=row.pk).phase == LOAD_QUEUED  # the API says it too
    assert (
        f"{LOAD_QUEUED}…" in card.content.decode() and ">Load</button>" not in card.content.decode()
    )
    tasks.model_load_task(row.pk)
    after = Model.objects.get(pk=row.pk)
    assert (after.is_loaded, after.phase) == (True, "")
    card = client.post(reverse("models:unload", args=[row.pk]), HTTP_HX_REQUEST="true")
    assert f"{UNLOAD_QUEUED}…" in card.content.decode()
    tasks.model_unload_task(row.pk)
    after = Model.objects.get(pk=row.pk)
    assert (after.is_loaded, after.phase) == (False, "")
    services.model_load(row.pk)
    resident.cache_reset()  # a worker restarted with the load queued: no stale words on the card
    assert Model.objects.get(pk=row.pk).phase == ""


def test_a_cancelled_download_is_retried_in_place_and_becomes_ready(client, hub):
    row = services.model_download(hf_repo_id="tiny/gpt2", quantization="Q8")
    services.model_cancel(row.pk)
    r = client.post(f"/api/models/{row.pk}/retry")
    assert r.status_code == 202 and r.json()["status"] == "queued", r.content
    tasks.model_download_task(row.pk)
    tasks.model_load_check_task(row.pk)
    row.refresh_from_db()
    assert (row.status, row.error_message, row.progress) == ("ready", "", 100.0)
    assert client.post(f"/api/models/{row.pk}/retry").status_code == 409  # nothing to retry


def test_retry_of_a_gated_repo_needs_the_token_again_and_keeps_the_row_on_refusal(client, hub):
    row = download("tiny/gated-llama", "Q4", token=GOOD_TOKEN)
    Model.objects.filter(pk=row.pk).update(status="error", error_message="(a failure)")
    r = client.post(f"/api/models/{row.pk}/retry")
    assert r.status_code == 403 and "accept the licence" in r.json()["detail"]
    assert Model.objects.get(pk=row.pk).status == "error"
    r = client.post(
        f"/api/models/{row.pk}/retry", {"access_token": GOOD_TOKEN}, content_type="application/json"
    )
    assert r.status_code == 202 and GOOD_TOKEN not in r.content.decode()


def test_the_card_of_a_failed_download_offers_retry(client, hub):
    row = services.model_download(hf_repo_id="tiny/gpt2", quantization="Q8")
    services.model_cancel(row.pk)
    card = client.get(f"/models/{row.pk}/card", headers={"HX-Request": "true"}).content.decode()
    assert f'hx-post="/models/{row.pk}/retry"' in card
    r = client.post(f"/models/{row.pk}/retry", headers={"HX-Request": "true"})
    assert r.status_code == 200 and 'data-status="queued"' in r.content.decode()
