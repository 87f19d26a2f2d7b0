"""The Datasets panel through Django's client: pages for plain requests, fragments for HTMX."""

from __future__ import annotations

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client
from django.urls import reverse

from datasets_app.models import Dataset, DatasetStatus

from .helpers import files_under, jsonl_bytes, worker_ended

pytestmark = pytest.mark.django_db(transaction=True)
HX = {"HTTP_HX_REQUEST": "true"}


def upload_post(client, filename: str, content: bytes, **extra):
    data = {"file": SimpleUploadedFile(filename, content), "text_field": "text", "name": ""}
    return client.post(reverse("datasets:upload"), data, **extra)


def test_the_page_shows_the_shell_forms_and_empty_state(client):
    page = client.get(reverse("datasets:page")).content.decode()
    assert "<html" in page and "Dataset Management" in page and "No datasets yet" in page
    assert 'id="upload-form"' in page and 'id="import-form"' in page
    assert 'ws-connect="/ws/datasets/"' in page and 'name="split" type="text" value="train"' in page
    # the shell's nav shows a live, active "datasets" tab once datasets:page exists
    assert 'href="/datasets/" class="py-4 px-2 border-b-2 capitalize border-emerald-400' in page


def test_htmx_requests_get_the_section_fragment(client):
    body = client.get(reverse("datasets:page"), **HX).content.decode()
    assert "<html" not in body and 'id="dataset-section"' in body


def test_htmx_upload_returns_the_section_with_the_new_queued_card(client, settings):
    r = upload_post(client, "stories.jsonl", jsonl_bytes([{"text": "hello there"}]), **HX)
    assert r.status_code == 201
    row = Dataset.objects.get()
    body = r.content.decode()
    assert f'id="dataset-{row.pk}"' in body and "<html" not in body
    assert 'data-status="queued"' in body and "Cancel" in body and row.name == "stories"
    worker_ended(row.pk)  # the card the websocket then pushes shows the rows
    body = client.get(reverse("datasets:card", args=[row.pk]), **HX).content.decode()
    assert 'data-status="ready"' in body and "1 rows" in body and "hello there" in body
    assert "<details" in body


def test_plain_upload_redirects_to_the_page(client):
    r = upload_post(client, "a.txt", b"one\ntwo\n")
    assert r.status_code == 302 and Dataset.objects.get().status == "queued"
    assert worker_ended(Dataset.objects.get().pk).row_count == 2


def test_a_bad_upload_is_a_4xx_fragment_for_the_form_and_changes_nothing(client, settings):
    r = upload_post(client, "a.jsonl", b'{"text": "ok"}\nnot json\n', **HX)
    assert r.status_code == 422 and r.headers["HX-Retarget"] == "#upload-error"
    assert "Line 2" in r.content.decode() and "<html" not in r.content.decode()
    plain = upload_post(client, "a.csv", b"body\nx\n")
    assert plain.status_code == 422 and "<html" in plain.content.decode()
    assert "no column" in plain.content.decode()
    assert Dataset.objects.count() == 0 and files_under(settings.DATASETS_DIR) == []


def test_an_upload_without_a_file_or_over_the_limit_is_refused(client, settings):
    r = client.post(reverse("datasets:upload"), {"name": "x"}, **HX)
    assert r.status_code == 422 and "Choose a file" in r.content.decode()
    settings.DATASET_UPLOAD_MAX_BYTES = 100
    r = upload_post(client, "a.txt", b"x" * 100_000, **HX)
    assert r.status_code == 413 and r.headers["HX-Retarget"] == "#upload-error"
    assert Dataset.objects.count() == 0


def test_the_upload_form_still_checks_csrf(settings):
    r = upload_post(Client(enforce_csrf_checks=True), "a.txt", b"one\n")
    assert r.status_code == 403 and Dataset.objects.count() == 0


def test_hub_import_through_the_form(client, dhub):
    r = client.post(
        reverse("datasets:import"),
        {
            "hf_dataset_id": "tiny/wiki",
            "split": "",
            "text_field": "",
            "revision": "",
            "access_token": "",
            "name": "",
        },
        **HX,
    )
    assert r.status_code == 201
    row = Dataset.objects.get()
    assert (row.split, row.text_field, row.status) == ("train", "text", "queued")
    assert 'data-status="queued"' in r.content.decode()


@pytest.mark.parametrize(
    ("repo", "status", "words"),
    [
        ("", 422, "Dataset repository:"),
        ("tiny/gated-data", 403, "accept its conditions"),
        ("tiny/wiki", 422, "splits found"),
    ],
)
def test_hub_form_errors_reach_the_form(client, dhub, repo, status, words):
    r = client.post(reverse("datasets:import"), {"hf_dataset_id": repo, "split": "nope"}, **HX)
    assert r.status_code == status and r.headers["HX-Retarget"] == "#import-error"
    assert words in r.content.decode() and Dataset.objects.count() == 0


def test_cards_show_progress_errors_and_actions(client):
    row = Dataset.objects.create(
        name="d",
        source="hub",
        hf_dataset_id="o/d",
        split="train",
        status=DatasetStatus.IMPORTING,
        progress=42.5,
        phase="downloading",
        bytes_done=425,
        bytes_total=1000,
        speed_bps=100,
        eta_seconds=6,
    )
    body = client.get(reverse("datasets:card", args=[row.pk]), **HX).content.decode()
    assert "42.5%" in body and "Import Progress" in body and "Cancel" in body
    assert "ETA 6 s" in body and "425 B / 1.0 KB" in body
    Dataset.objects.filter(pk=row.pk).update(status=DatasetStatus.ERROR, error_message="boom")
    body = client.get(reverse("datasets:card", args=[row.pk]), **HX).content.decode()
    assert "boom" in body and "hx-confirm" in body and "Cancel" not in body


def test_cancel_and_delete_through_the_page(client, dhub, settings):
    client.post(reverse("datasets:import"), {"hf_dataset_id": "tiny/wiki"})
    row = Dataset.objects.get()
    r = client.post(reverse("datasets:delete", args=[row.pk]), **HX)
    assert r.status_code == 409 and "cancel the import" in r.content.decode()
    r = client.post(reverse("datasets:cancel", args=[row.pk]), **HX)
    assert r.status_code == 200 and 'data-status="cancelled"' in r.content.decode()
    r = client.post(reverse("datasets:delete", args=[row.pk]), **HX)
    assert r.status_code == 200 and "No datasets yet" in r.content.decode()


def test_unknown_dataset_is_404_not_500(client):
    assert client.get(reverse("datasets:card", args=["d_nope"]), **HX).status_code == 404
    assert client.post(reverse("datasets:delete", args=["d_nope"]), **HX).status_code == 404
    assert client.post(reverse("datasets:cancel", args=["d_nope"])).status_code == 404
