"""JSON API contract for models (architecture.md §6)."""

from __future__ import annotations

import json

import pytest
from django.db import connection

from conftest import GOOD_TOKEN
from mistudio.testing.queues import queued_task_payloads, stored_task_records
from models_app.models import HubCredential, Model

from .helpers import download

pytestmark = pytest.mark.django_db(transaction=True)


def post(client, url, data):
    return client.post(url, json.dumps(data), content_type="application/json")


def test_download_returns_201_with_the_seed_fields(client, hub):
    r = post(client, "/api/models/download", {"hf_repo_id": "tiny/llama", "quantization": "Q4"})
    assert r.status_code == 201
    body = r.json()
    for field in (
        "id",
        "name",
        "hf_repo_id",
        "quantization",
        "params",
        "num_layers",
        "hidden_dim",
        "num_heads",
        "vocab_size",
        "max_position",
        "status",
        "progress",
        "error_message",
        "size_bytes",
        "mem_req_bytes",
        "memReq",
        "is_loaded",
        "created_at",
        "updated_at",
    ):
        assert field in body
    assert body["id"].startswith("m_") and body["status"] == "queued"
    assert body["params"] > 0 and body["memReq"].endswith("B")


@pytest.mark.parametrize("bad", ["../x", "http://evil/x", "y" * 200, "ünï/x", "", None, 5])
def test_bad_repo_ids_are_422_with_a_message(client, hub, bad):
    r = post(client, "/api/models/download", {"hf_repo_id": bad, "quantization": "Q4"})
    assert r.status_code == 422 and r.json()["detail"]
    assert Model.objects.count() == 0


def test_malformed_bodies_are_4xx(client, hub):
    r = client.post("/api/models/download", "{not json", content_type="application/json")
    assert 400 <= r.status_code < 500
    r = post(client, "/api/models/download", ["a", "list"])
    assert 400 <= r.status_code < 500


def test_duplicate_is_409(client, hub):
    assert (
        post(
            client, "/api/models/download", {"hf_repo_id": "tiny/gpt2", "quantization": "Q8"}
        ).status_code
        == 201
    )
    r = post(client, "/api/models/download", {"hf_repo_id": "tiny/gpt2", "quantization": "Q8"})
    assert r.status_code == 409 and "already" in r.json()["detail"]


def test_hub_errors_map_to_statuses(client, hub):
    cases = {"tiny/gated-llama": 403, "tiny/missing": 404, "tiny/pickle-only": 422}
    for repo, status in cases.items():
        r = post(client, "/api/models/download", {"hf_repo_id": repo, "quantization": "Q4"})
        assert r.status_code == status, (repo, r.json())
    r = post(
        client,
        "/api/models/download",
        {"hf_repo_id": "tiny/llama", "quantization": "Q4", "access_token": "hf_bad0000000000"},
    )
    assert r.status_code == 401 and "invalid" in r.json()["detail"]


def test_list_get_architecture_cancel_delete(client, hub):
    row = download("tiny/llama", "Q8")
    assert [m["id"] for m in client.get("/api/models").json()] == [row.pk]
    assert client.get("/api/models?status=ready").json()[0]["status"] == "ready"
    assert client.get("/api/models?status=bogus").status_code == 422
    assert client.get(f"/api/models/{row.pk}").json()["num_layers"] == 2
    arch = client.get(f"/api/models/{row.pk}/architecture").json()
    assert (arch["total_layers"], arch["hidden_dimension"], arch["attention_heads"]) == (2, 128, 4)
    assert arch["config"]["vocab_size"] == 384 and arch["config"]["architecture"]
    assert client.post(f"/api/models/{row.pk}/cancel").status_code == 409
    assert client.delete(f"/api/models/{row.pk}").status_code == 204
    assert client.get(f"/api/models/{row.pk}").status_code == 404


def test_architecture_of_a_model_not_ready_is_409(client, hub):
    r = post(client, "/api/models/download", {"hf_repo_id": "tiny/gpt2", "quantization": "Q8"})
    assert client.get(f"/api/models/{r.json()['id']}/architecture").status_code == 409


def test_unsafe_routes_need_the_csrf_token(hub):
    from django.test import Client

    c = Client(enforce_csrf_checks=True)
    r = c.post(
        "/api/models/download",
        json.dumps({"hf_repo_id": "tiny/gpt2"}),
        content_type="application/json",
    )
    assert r.status_code == 403 and Model.objects.count() == 0
    assert c.get("/api/models").status_code == 200


def test_the_token_is_never_stored_in_plain_or_echoed(client, hub):
    r = post(
        client,
        "/api/models/download",
        {"hf_repo_id": "tiny/gated-llama", "quantization": "Q4", "access_token": GOOD_TOKEN},
    )
    assert r.status_code == 201 and GOOD_TOKEN not in r.content.decode()
    cred = HubCredential.objects.get()
    assert GOOD_TOKEN.encode() not in bytes(cred.ciphertext)
    payloads = queued_task_payloads() + stored_task_records()
    assert cred.model_id in repr(payloads) and GOOD_TOKEN not in repr(payloads)
    with connection.cursor() as cur:
        for table in connection.introspection.table_names():
            cur.execute(f'SELECT * FROM "{table}"')  # noqa: S608 - test-only table dump
            assert GOOD_TOKEN not in repr(cur.fetchall()), table


def test_a_bad_token_is_not_echoed_in_the_error(client, hub):
    bad = "hf_bad token with spaces"
    r = post(client, "/api/models/download", {"hf_repo_id": "tiny/llama", "access_token": bad})
    assert r.status_code == 422 and bad not in r.content.decode()


def test_openapi_schema_lists_the_routes(client):
    schema = client.get("/api/openapi.json").json()
    assert "/api/models/download" in schema["paths"]
