"""Push to Hub: a completed extraction goes to a dataset repo on the fake hub (API, page form and
CLI), and comes back byte for byte through huggingface_hub's own download; the card says what
the manifest says; refusals end the push with the Hub's reason and drop the token."""

from __future__ import annotations

import hashlib
import io
import json
from datetime import timedelta
from pathlib import Path

import pytest
import yaml
from django.core.management import CommandError, call_command
from django.utils import timezone
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import HfHubHTTPError

from mistudio.testing.fakehub import UNAPPROVED_TOKEN, VALID_TOKEN
from mistudio.testing.queues import queued_task_payloads, queues_purge
from models_app import reconcile, share, tasks
from models_app.consumers import card_html
from models_app.ml.card import dataset_card
from models_app.models import PushCredential, PushJob, PushStatus

from .helpers import download, extract, in_thread, text_dataset, wait_for

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def completed(hub):
    """A completed extraction of tiny/gpt2 (two layers, residual and MLP output)."""
    job = extract(download("tiny/gpt2", "FP16"), text_dataset(), hook_types=["residual", "mlp"])
    assert job.status == "completed", job.error_message
    return job


def post(client, url, data):
    return client.post(url, json.dumps(data), content_type="application/json")


def pushed(client, job, repo_id, token=VALID_TOKEN, **extra):
    """POST the push, run its task inline (as the download cluster would), return the row."""
    r = post(
        client, f"/api/extractions/{job.pk}/push", {"repo_id": repo_id, "token": token, **extra}
    )
    assert r.status_code == 202, r.text
    assert r.json()["status"] == "queued" and token not in r.text
    tasks.push_run_task(r.json()["id"])
    return PushJob.objects.get(pk=r.json()["id"])


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fetch(hub, repo_id: str, name: str, tmp_path, token=VALID_TOKEN) -> Path:
    return Path(hf_hub_download(repo_id, name, repo_type="dataset", endpoint=hub.endpoint,
                                token=token, cache_dir=tmp_path / "readback"))  # fmt: skip


def test_a_push_round_trips_through_the_hub(client, hub, completed, tmp_path):
    push = pushed(client, completed, "tester/gpt2-acts")
    assert push.status == PushStatus.COMPLETED, push.error_message
    assert push.repo_url == f"{hub.endpoint}/datasets/tester/gpt2-acts"
    assert push.bytes_done == push.bytes_total > 0 and push.progress == 100.0
    files = share.push_files(completed.output_path, completed.manifest)
    assert push.files_total == len(files) + 1 == 1 + 4 + 1  # manifest, 2 sites × 2 layers, card
    for name, local, _ in files:
        assert sha256(fetch(hub, "tester/gpt2-acts", name, tmp_path)) == sha256(local), name
    repo = hub.dataset_repos["tester/gpt2-acts"]
    assert repo.private and repo.main == push.commit_sha
    with pytest.raises(HfHubHTTPError):  # private: anonymous readers are refused
        fetch(hub, "tester/gpt2-acts", "manifest.json", tmp_path / "anonymous", token=False)
    assert PushCredential.objects.count() == 0  # the token went with the push's end
    got = client.get(f"/api/extractions/{completed.pk}/pushes/{push.pk}").json()
    assert got["status"] == "completed" and got["commit_sha"] == push.commit_sha


def test_the_card_says_what_the_manifest_says(client, hub, completed, tmp_path):
    push = pushed(client, completed, "tester/carded", private=False)
    assert push.status == PushStatus.COMPLETED, push.error_message
    card = fetch(hub, "tester/carded", "README.md", tmp_path, token=False).read_text()
    assert not hub.dataset_repos["tester/carded"].private
    m = json.loads((Path(completed.output_path) / "manifest.json").read_text())
    header = yaml.safe_load(card.split("---\n")[1])
    assert header["task_categories"] == ["feature-extraction"] and header["license"] == "other"
    assert {"activations", "sparse-autoencoder", "gpt2"} <= set(header["tags"])
    assert header["size_categories"] == ["n<1K"]  # 12 sequences × 32 tokens
    model, ds = m["model"], m["dataset"]
    for expected in (model["repo"], model["commit"], model["revision"], "FP16", model["dtype"],
                     ds["name"], ds["texts_sha256"], f"{m['n_tokens']:,}",
                     f"{m['n_sequences']} × {m['context_size']}", "`text`: special-token",
                     'open_extraction(snapshot_download("tester/carded"'):  # fmt: skip
        assert expected in card, expected
    for hook in m["hooks"]:
        stats = hook["statistics"]
        row = next(
            line
            for line in card.splitlines()
            if line.startswith(f"| `{hook['name']}` | {stats['mean']:.4g}")
        )
        assert f"{stats['norm']['p99']:.4g}" in row and f"{stats['norm']['mean']:.4g}" in row
        assert f"| [{', '.join(map(str, hook['shape']))}] |" in card
    for name, version in m["environment"]["python_libraries"].items():
        assert f"| {name} | {version or 'not installed'} |" in card
    assert f"[{model['repo']}]({hub.endpoint}/{model['repo']})" in card  # the Hub pushed to
    assert "huggingface.co" not in card and "text field ``" not in card
    card_again = dataset_card(m, repo_id="tester/carded", endpoint=hub.endpoint)
    assert card == card_again  # the card pushed is the generated one


def test_progress_reaches_the_live_page(client, hub, completed):
    """Mid-upload (the hub holds the LFS uploads once their bytes are in) the row is running and
    says it is uploading, with no byte counted yet: a file counts once the Hub has answered its
    upload (bytes merely read ran to ~100 % long before the Hub had them). The websocket's
    fragment shows the bar; then the repo's link."""
    r = post(
        client,
        f"/api/extractions/{completed.pk}/push",
        {"repo_id": "tester/live", "token": VALID_TOKEN},
    )
    shards = {sha for _, _, sha in share.push_files(completed.output_path, completed.manifest)}
    shards.discard(None)
    hub.hold_uploads()
    try:
        worker = in_thread(tasks.push_run_task, r.json()["id"])
        assert hub.wait_until_upload_held(timeout=300)
        assert wait_for(lambda: shards <= {oid for _, oid in hub.uploaded}, timeout=300)
        every_byte_read = timezone.now() + timedelta(seconds=0.5)  # the row is written after
        mid = wait_for(
            lambda: PushJob.objects.filter(updated_at__gt=every_byte_read).first(), timeout=300
        )
        assert mid.bytes_done == 0 and mid.progress == 0  # no upload has been answered yet
        assert mid.status == "running" and mid.phase == share.UPLOADING
        html = card_html(completed.model_id)
        assert "Pushing to tester/live" in html and 'role="progressbar"' in html
        assert "uploading" in html
    finally:
        hub.release_uploads()
    worker.join(timeout=300)
    push = PushJob.objects.get()
    assert push.status == "completed" and push.bytes_done == push.bytes_total
    html = card_html(completed.model_id)
    status = f'id="push-status-{completed.pk}" class="push-status" hx-swap-oob="true"'
    assert html.count(status) == 1  # pushed on its own …
    assert html.count(f'id="push-status-{completed.pk}"') == 2  # … and inside the row, not oob
    assert push.commit_sha[:7] in html and f'href="{push.repo_url}"' in html


def test_the_byte_counter_moves_file_by_file_then_says_committing():
    counter = share.ByteCounter()
    for oid, size in (("a", 10), ("b", 5), ("a", 10)):  # two identical files: one object
        counter.expect(oid, size)
    assert counter.done == 0 and counter.phase == share.UPLOADING
    counter.sent("a")
    assert counter.done == 20 and counter.phase == share.UPLOADING
    counter.sent("b")
    assert counter.done == 25 and counter.phase == share.COMMITTING


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        ("hf_notarealtoken000000000", "refused the access token (401)"),
        (UNAPPROVED_TOKEN, "may not write to tester/refused (403)"),
    ],
)
def test_a_refused_token_ends_the_push_with_the_reason(client, hub, completed, token, reason):
    push = pushed(client, completed, "tester/refused", token=token)
    assert push.status == PushStatus.FAILED and reason in push.error_message
    assert token not in push.error_message and push.finished_at is not None
    assert PushCredential.objects.count() == 0 and "tester/refused" not in hub.dataset_repos


def test_a_foreign_namespace_is_refused_with_the_reason(client, hub, completed):
    push = pushed(client, completed, "someone-else/acts")
    assert push.status == PushStatus.FAILED, push.error_message
    assert "may not write to someone-else/acts (403)" in push.error_message
    assert "someone-else" in push.error_message and "namespace" in push.error_message


def test_an_unreachable_hub_ends_the_push_with_the_reason(client, hub, completed, settings):
    settings.HF_ENDPOINT = "http://127.0.0.1:9"  # discard port: nothing listens
    push = pushed(client, completed, "tester/offline")
    assert push.status == PushStatus.FAILED
    assert push.error_message.startswith("Could not reach the Hub at http://127.0.0.1:9")


def test_an_altered_shard_is_not_pushed(client, hub, completed):
    name, path, _ = share.push_files(completed.output_path, completed.manifest)[1]
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    push = pushed(client, completed, "tester/altered")
    assert push.status == PushStatus.FAILED
    assert push.error_message == (
        f"{name} differs from the sha256 the manifest lists (altered on disk); nothing was pushed."
    )
    assert hub.dataset_repos["tester/altered"].commits[
        hub.dataset_repos["tester/altered"].main
    ].keys() == {".gitattributes"}


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        ({"repo_id": "no-owner"}, 422, "Give the owner too: your-name/no-owner"),
        ({"repo_id": "a/b/c"}, 422, "A repo id is owner/dataset-name"),
        ({"repo_id": "a/" + "x" * 120}, 422, "at most 96 characters"),
        ({"repo_id": "https://huggingface.co/datasets/a/b"}, 422, "not a URL"),
        ({"repo_id": "a/b--c"}, 422, "Invalid repo id"),
        ({"repo_id": "tester/x", "token": ""}, 422, "access token with write access"),
        ({"repo_id": "tester/x", "token": "hf bad"}, 422, "one word of printable ASCII"),
        (
            {"repo_id": "tester/x", "private": "maybe"},
            422,
            "private: Input should be a valid boolean",
        ),
        ({"repo_id": "tester/x", "private": "yes"}, 422, "private: Input should be a valid bool"),
        ({"repo_id": "tester/x", "private": "false"}, 422, "private: Input should be a valid b"),
        ({"repo_id": "tester/x", "private": 1}, 422, "private: Input should be a valid boolean"),
    ],
)
def test_bad_input_is_4xx_and_changes_nothing(client, hub, completed, body, status, says):
    body = {"token": VALID_TOKEN, **body}
    r = post(client, f"/api/extractions/{completed.pk}/push", body)
    assert r.status_code == status and says in r.json()["detail"], r.text
    assert VALID_TOKEN not in r.text
    assert PushJob.objects.count() == 0 and PushCredential.objects.count() == 0


def test_only_completed_extractions_are_pushed(client, hub, completed):
    r = post(client, "/api/extractions/x_nope/push", {"repo_id": "tester/x", "token": VALID_TOKEN})
    assert r.status_code == 404
    type(completed).objects.filter(pk=completed.pk).update(status="failed")
    r = post(
        client,
        f"/api/extractions/{completed.pk}/push",
        {"repo_id": "tester/x", "token": VALID_TOKEN},
    )
    assert r.status_code == 409 and "only a completed one" in r.json()["detail"]


def test_one_live_push_per_extraction_and_no_delete_under_it(client, hub, completed):
    body = {"repo_id": "tester/twice", "token": VALID_TOKEN}
    assert post(client, f"/api/extractions/{completed.pk}/push", body).status_code == 202
    r = post(client, f"/api/extractions/{completed.pk}/push", body)
    assert r.status_code == 409 and "being pushed already" in r.json()["detail"]
    assert PushCredential.objects.count() == 1
    r = client.delete(f"/api/extractions/{completed.pk}")
    assert r.status_code == 409 and "being pushed to the Hub" in r.json()["detail"]
    r = client.delete(f"/api/models/{completed.model_id}")
    assert r.status_code == 409 and Path(completed.output_path, "manifest.json").is_file()
    tasks.push_run_task(PushJob.objects.get().pk)
    assert client.delete(f"/api/extractions/{completed.pk}").status_code == 204
    assert not PushJob.objects.exists()  # its pushes go with it


def test_the_page_form_queues_a_push_and_refuses_bad_input(client, hub, completed):
    page = client.get(f"/models/{completed.model_id}/extractions").content.decode()
    assert f'hx-post="/models/extractions/{completed.pk}/push"' in page and "Push to Hub" in page
    url = f"/models/extractions/{completed.pk}/push"
    r = client.post(url, {"repo_id": "bad id", "token": VALID_TOKEN}, HTTP_HX_REQUEST="true")
    assert r.status_code == 422 and r["HX-Retarget"] == f"#push-error-{completed.pk}"
    assert VALID_TOKEN not in r.content.decode() and PushJob.objects.count() == 0
    form = {"repo_id": "tester/form", "token": VALID_TOKEN, "private": "1"}
    r = client.post(url, form, HTTP_HX_REQUEST="true")
    assert r.status_code == 202 and f'id="push-status-{completed.pk}"' in r.content.decode()
    assert VALID_TOKEN not in r.content.decode()
    push = PushJob.objects.get()
    assert push.private and push.repo_id == "tester/form" and push.status == "queued"


def test_the_cli_pushes_with_the_token_from_the_environment(hub, completed, monkeypatch, tmp_path):
    monkeypatch.setenv("MY_HUB_TOKEN", VALID_TOKEN)
    out, err = io.StringIO(), io.StringIO()
    call_command("push_activations", completed.pk, "tester/cli", "--token-env", "MY_HUB_TOKEN",
                 stdout=out, stderr=err)  # fmt: skip
    push = PushJob.objects.get()
    assert push.status == "completed" and push.repo_url in out.getvalue()
    assert VALID_TOKEN not in out.getvalue() + err.getvalue()
    name, local, _ = share.push_files(completed.output_path, completed.manifest)[-1]
    assert sha256(fetch(hub, "tester/cli", name, tmp_path)) == sha256(local)


def test_the_cli_refuses_without_a_token_and_names_the_variable(hub, completed, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(CommandError, match=r"write access is needed to push\. \(set HF_TOKEN\)"):
        call_command("push_activations", completed.pk, "tester/cli")
    assert PushJob.objects.count() == 0


def test_a_dead_workers_push_is_ended_and_a_lost_one_queued_again(client, hub, completed, settings):
    body = {"repo_id": "tester/stale", "token": VALID_TOKEN}
    r = post(client, f"/api/extractions/{completed.pk}/push", body)
    queues_purge()  # the task went with a dead worker: the worker's start queues it again
    assert reconcile.jobs_requeue(settings.DOWNLOAD_CLUSTER) == 1
    assert [p["args"] for p in queued_task_payloads()] == [(r.json()["id"],)]
    assert VALID_TOKEN not in repr(queued_task_payloads())
    long_ago = timezone.now() - timedelta(seconds=settings.STALE_HEARTBEAT_SECONDS + 1)
    PushJob.objects.update(status="running", heartbeat_at=long_ago)
    assert reconcile.jobs_reconcile() == 1
    push = PushJob.objects.get()
    assert push.status == "failed" and push.error_message == reconcile.PUSH_STALE
    assert PushCredential.objects.count() == 0
    tasks.push_run_task(push.pk)  # a late delivery of its task does nothing
    assert PushJob.objects.get().status == "failed" and "tester/stale" not in hub.dataset_repos


def test_the_card_names_the_text_field_only_when_there_is_one(completed):
    m = json.loads(json.dumps(completed.manifest))
    m["dataset"]["text_field"] = ""  # an uploaded .txt: no field
    card = dataset_card(m, repo_id="tester/x")
    assert "text field" not in card and f"{m['dataset']['name']}: uploaded file" in card
    m["dataset"]["text_field"] = "content"
    assert "text field `content`," in dataset_card(m, repo_id="tester/x")
    default = dataset_card(m, repo_id="tester/x")
    assert f"(https://huggingface.co/{m['model']['repo']})" in default
    mirror = dataset_card(m, repo_id="tester/x", endpoint="http://hub.internal:8080/")
    assert f"(http://hub.internal:8080/{m['model']['repo']})" in mirror


def test_a_tampered_manifest_is_not_pushed(client, hub, completed):
    manifest = Path(completed.output_path) / "manifest.json"
    for text in ("{}", manifest.read_text().replace('"n_tokens"', '"n_tokens_x"'), "not json"):
        manifest.write_text(text)
        push = pushed(client, completed, "tester/tampered")
        assert push.status == PushStatus.FAILED and "manifest.json" in push.error_message
        assert "nothing was pushed" in push.error_message and push.commit_sha == ""
        assert "tester/tampered" not in hub.dataset_repos  # checked before the repo is made
        PushJob.objects.all().delete()


@pytest.mark.parametrize("repeats", [False, True], ids=["hub-dedups", "batch-repeats-oids"])
def test_identical_shards_push_and_read_back(client, hub, monkeypatch, tmp_path, repeats):
    """blocks.0.hook_resid_post and blocks.1.hook_resid_pre hold the same activations: their
    shards are byte-identical, one LFS object. Pushed again and again (whether or not the
    Hub's LFS batch repeats an object asked for twice), every file reads back equal."""
    job = extract(
        download("tiny/gpt2", "FP16"), text_dataset(), hook_types=["residual", "resid_pre"]
    )
    assert job.status == "completed", job.error_message
    files = share.push_files(job.output_path, job.manifest)
    shas = [sha for _, _, sha in files if sha]
    assert len(set(shas)) < len(shas)  # some shards are identical
    monkeypatch.setattr(hub, "lfs_batch_repeats", repeats)
    for i in range(3):
        push = pushed(client, job, f"tester/same-{int(repeats)}-{i}")
        assert push.status == PushStatus.COMPLETED, push.error_message
        assert push.bytes_done == push.bytes_total
        for name, local, _ in files:
            got = fetch(hub, f"tester/same-{int(repeats)}-{i}", name, tmp_path / str(i))
            assert sha256(got) == sha256(local), name
