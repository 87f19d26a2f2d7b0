"""JSON API contract for datasets (architecture.md §6)."""

from __future__ import annotations

import json

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import connection
from django.test import Client

from conftest import GOOD_TOKEN
from datasets_app.models import Dataset
from mistudio.testing.queues import queued_task_payloads

from .helpers import files_under, jsonl_bytes, parquet_bytes, worker_ended

pytestmark = pytest.mark.django_db(transaction=True)
FIELDS = (
    "id",
    "name",
    "source",
    "hf_dataset_id",
    "split",
    "revision",
    "text_field",
    "status",
    "progress",
    "phase",
    "error_message",
    "row_count",
    "size_bytes",
    "preview",
    "created_at",
    "updated_at",
)


def post_json(client, data):
    return client.post("/api/datasets", json.dumps(data), content_type="application/json")


def post_file(client, filename: str, content: bytes, **fields):
    return client.post("/api/datasets", {"file": SimpleUploadedFile(filename, content), **fields})


def test_a_multipart_upload_is_202_queued_then_ready_through_the_worker(client):
    r = post_file(
        client, "rows.jsonl", jsonl_bytes([{"t": "a"}, {"t": "b"}]), text_field="t", name="Two rows"
    )
    assert r.status_code == 202, r.json()
    body = r.json()
    for field in FIELDS:
        assert field in body
    assert (body["status"], body["row_count"], body["preview"]) == ("queued", 0, [])
    assert body["name"] == "Two rows" and body["id"].startswith("d_")
    assert [p["args"] for p in queued_task_payloads()] == [(body["id"],)]
    worker_ended(body["id"])
    body = client.get(f"/api/datasets/{body['id']}").json()
    assert (body["status"], body["row_count"], body["preview"]) == ("ready", 2, ["a", "b"])
    assert body["size_bytes"] == len(b'"a"\n"b"\n')


def test_a_hub_import_is_202_queued(client, dhub):
    r = post_json(client, {"hf_dataset_id": "tiny/wiki", "split": "train", "text_field": "text"})
    assert r.status_code == 202, r.json()
    assert (r.json()["status"], r.json()["source"]) == ("queued", "hub")


def test_a_parquet_upload_is_202_queued(client, settings):
    r = post_file(client, "a.parquet", parquet_bytes({"text": ["x"] * 100}))
    assert r.status_code == 202 and r.json()["status"] == "queued"
    assert files_under(settings.DATASETS_DIR / r.json()["id"]) == ["upload.parquet"]


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"hf_dataset_id": "../etc"}, "hf_dataset_id"),
        ({"hf_dataset_id": "https://huggingface.co/datasets/x/y"}, "hf_dataset_id"),
        ({"hf_dataset_id": None}, "hf_dataset_id"),
        ({}, "hf_dataset_id"),
        ({"hf_dataset_id": "tiny/wiki", "split": "train/../x"}, "split"),
        ({"hf_dataset_id": "tiny/wiki", "text_field": "x" * 300}, "text_field"),
        ({"hf_dataset_id": "tiny/wiki", "revision": "a b"}, "revision"),
        ({"hf_dataset_id": "tiny/wiki", "name": "bad\x00name"}, "name"),
    ],
)
def test_invalid_json_fields_are_422_naming_the_field(client, dhub, data, field):
    r = post_json(client, data)
    assert r.status_code == 422, r.json()
    assert [e["field"] for e in r.json()["errors"]] == [field] and r.json()["detail"]
    assert Dataset.objects.count() == 0


def test_malformed_bodies_are_400(client):
    r = client.post("/api/datasets", "{not json", content_type="application/json")
    assert r.status_code == 400 and "JSON object" in r.json()["detail"]
    assert post_json(client, ["a", "list"]).status_code == 400
    r = client.post("/api/datasets", {"name": "no file"})
    assert r.status_code == 422 and "'file'" in r.json()["detail"]


@pytest.mark.parametrize("ctype", ["multipart/form-data; boundary=xyz", "multipart/form-data"])
def test_broken_multipart_bodies_are_4xx_not_500(client, ctype):
    r = client.generic("POST", "/api/datasets", b"--xyz\r\ngarbage", content_type=ctype)
    assert 400 <= r.status_code < 500 and Dataset.objects.count() == 0


def test_upload_refusals_are_4xx_and_leave_nothing(client, settings):
    assert post_file(client, "a.docx", b"x").status_code == 422
    r = post_file(client, "a.jsonl", b'{"text": 1}\n')
    assert r.status_code == 422 and "Line 1" in r.json()["detail"]
    settings.DATASET_UPLOAD_MAX_BYTES = 1000
    r = post_file(client, "a.txt", b"x" * 200_000)
    assert r.status_code == 413 and r.json()["code"] == "too_large"
    assert Dataset.objects.count() == 0 and files_under(settings.DATASETS_DIR) == []


def test_hub_errors_map_to_statuses(client, dhub):
    cases = {"tiny/gated-data": 403, "tiny/missing": 404, "tiny/no-data": 422}
    for repo, status in cases.items():
        r = post_json(client, {"hf_dataset_id": repo})
        assert r.status_code == status, (repo, r.json())
    r = post_json(client, {"hf_dataset_id": "tiny/wiki", "access_token": "hf_bad0000000000"})
    assert r.status_code == 401 and "invalid" in r.json()["detail"]


def test_list_get_cancel_delete(client, dhub):
    ready = post_file(client, "a.txt", b"one\n").json()
    worker_ended(ready["id"])
    queued = post_json(client, {"hf_dataset_id": "tiny/wiki"}).json()
    assert [d["id"] for d in client.get("/api/datasets").json()] == [queued["id"], ready["id"]]
    assert [d["id"] for d in client.get("/api/datasets?status=ready").json()] == [ready["id"]]
    assert client.get("/api/datasets?status=bogus").status_code == 422
    assert client.get(f"/api/datasets/{ready['id']}").json()["preview"] == ["one"]
    assert client.delete(f"/api/datasets/{queued['id']}").status_code == 409
    assert client.post(f"/api/datasets/{ready['id']}/cancel").status_code == 409
    r = client.post(f"/api/datasets/{queued['id']}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    for d in (ready, queued):
        assert client.delete(f"/api/datasets/{d['id']}").status_code == 204
        assert client.get(f"/api/datasets/{d['id']}").status_code == 404


def test_unknown_ids_are_404(client):
    assert client.get("/api/datasets/d_nope").status_code == 404
    assert client.delete("/api/datasets/d_nope").status_code == 404
    assert client.post("/api/datasets/d_nope/cancel").status_code == 404


def test_unsafe_routes_need_the_csrf_token(dhub):
    c = Client(enforce_csrf_checks=True)
    r = c.post(
        "/api/datasets", json.dumps({"hf_dataset_id": "tiny/wiki"}), content_type="application/json"
    )
    assert r.status_code == 403 and Dataset.objects.count() == 0
    assert c.get("/api/datasets").status_code == 200


def test_the_token_is_never_stored_in_plain_or_echoed(client, dhub):
    r = post_json(client, {"hf_dataset_id": "tiny/gated-data", "access_token": GOOD_TOKEN})
    assert r.status_code == 202 and GOOD_TOKEN not in r.content.decode()
    queued = queued_task_payloads()  # the ORM queue or Redis, as configured
    assert [p["args"] for p in queued] == [(r.json()["id"],)]
    assert GOOD_TOKEN not in repr(queued)
    with connection.cursor() as cur:
        for table in connection.introspection.table_names():
            cur.execute(f'SELECT * FROM "{table}"')  # noqa: S608 - test-only table dump
            assert GOOD_TOKEN not in repr(cur.fetchall()), table
    bad = "hf_bad token with spaces"
    r = post_json(client, {"hf_dataset_id": "tiny/wiki", "access_token": bad})
    assert r.status_code == 422 and bad not in r.content.decode()


def test_openapi_documents_both_request_bodies(client):
    schema = client.get("/api/openapi.json").json()
    content = schema["paths"]["/api/datasets"]["post"]["requestBody"]["content"]
    assert {"application/json", "multipart/form-data"} <= set(content)
    assert "/api/datasets/{dataset_id}/cancel" in schema["paths"]
