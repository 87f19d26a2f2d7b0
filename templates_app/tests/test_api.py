"""JSON API contract for extraction templates (architecture.md §6)."""

from __future__ import annotations

import uuid

import pytest
from django.test import Client

from templates_app.models import ExtractionTemplate

from .helpers import VALID, make, send, snapshot

pytestmark = pytest.mark.django_db(transaction=True)
BASE = "/api/templates/extraction"
FIELDS = {
    "id",
    "name",
    "description",
    "layers",
    "hook_types",
    "module_sites",
    "max_samples",
    "batch_size",
    "context_size",
    "special_tokens",
    "output_format",
    "top_k_examples",
    "is_favorite",
    "created_at",
    "updated_at",
}


def test_create_returns_201_with_every_field(api):
    r = send(
        api,
        "post",
        BASE,
        {"name": "mine", "layers": [11, 0, 6, 6], "hook_types": ["mlp", "residual"]},
    )
    assert r.status_code == 201
    body = r.json()
    assert set(body) == FIELDS
    assert uuid.UUID(body["id"]) and body["name"] == "mine"
    assert body["layers"] == [0, 6, 11] and body["hook_types"] == ["residual", "mlp"]
    assert (body["max_samples"], body["batch_size"], body["context_size"]) == (1000, 32, 128)
    assert body["top_k_examples"] == 100 and body["is_favorite"] is False
    assert ExtractionTemplate.objects.get().name == "mine"


def test_a_duplicate_name_is_409_and_saves_nothing(api):
    make("taken")
    r = send(api, "post", BASE, {**VALID, "name": "taken"})
    assert r.status_code == 409 and "already exists" in r.json()["detail"]
    assert r.json()["code"] == "duplicate" and ExtractionTemplate.objects.count() == 1


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("layers", [], "at least one layer"),
        ("hook_types", [], "at least one hook type"),
        ("hook_types", ["resid"], "hook_types"),
        ("layers", [-1], "between 0 and 1,023"),
        ("layers", [1024], "between 0 and 1,023"),
        ("layers", [True], "not true/false"),
        ("layers", list(range(257)), "at most 256"),
        ("name", "   ", "give the template a name"),
        ("name", "x" * 256, "at most 255"),
        ("name", "tab\there", "control"),
        ("description", "d" * 501, "at most 500"),
        ("batch_size", 0, "Batch size must be between 1 and 1,024"),
        ("batch_size", 1025, "between 1 and 1,024"),
        ("max_samples", 0, "Max samples"),
        ("max_samples", 100_000_001, "Max samples"),
        ("context_size", 1, "Context size"),
        ("top_k_examples", 10_001, "Top-k"),
        ("batch_size", "many", "batch_size"),
        ("output_format", "parquet", "should be 'safetensors' or 'safetensors+saelens'"),
    ],
)
def test_invalid_settings_are_422_with_a_message(api, field, value, words):
    r = send(api, "post", BASE, {**VALID, field: value})
    assert r.status_code == 422, r.content
    assert words.lower() in r.json()["detail"].lower()
    assert ExtractionTemplate.objects.count() == 0


def test_messages_never_echo_the_input(api):
    r = send(api, "post", BASE, {**VALID, "hook_types": ["secret-value-123"]})
    assert r.status_code == 422 and "secret-value-123" not in r.content.decode()


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b"null", b'"text"', b"[" * 5000])
def test_malformed_bodies_are_4xx(api, body):
    r = send(api, "post", BASE, body)
    assert 400 <= r.status_code < 500 and r.json()["detail"]


def test_list_is_newest_first_with_total_limit_offset(api):
    names = [make(f"t{i}", is_favorite=i % 2 == 0).name for i in range(5)]
    body = api.get(BASE).json()
    assert [t["name"] for t in body["templates"]] == names[::-1]
    assert (body["total"], body["limit"], body["offset"]) == (5, 50, 0)
    page = api.get(f"{BASE}?limit=2&offset=1").json()
    assert [t["name"] for t in page["templates"]] == ["t3", "t2"] and page["total"] == 5
    favs = api.get(f"{BASE}?is_favorite=true").json()
    assert {t["name"] for t in favs["templates"]} == {"t0", "t2", "t4"} and favs["total"] == 3
    assert api.get(f"{BASE}?is_favorite=false").json()["total"] == 2


def test_an_empty_list(api):
    assert api.get(BASE).json() == {"templates": [], "total": 0, "limit": 50, "offset": 0}


@pytest.mark.parametrize(
    "query",
    [
        "limit=0",
        "limit=501",
        "limit=x",
        "offset=-1",
        "offset=99999999999999999999",
        "is_favorite=maybe",
    ],
)
def test_bad_list_parameters_are_422(api, query):
    r = api.get(f"{BASE}?{query}")
    assert r.status_code == 422 and r.json()["detail"]


def test_get_one_and_404s(api):
    row = make("one")
    r = api.get(f"{BASE}/{row.pk}")
    assert r.status_code == 200 and r.json()["name"] == "one" and set(r.json()) == FIELDS
    assert api.get(f"{BASE}/{uuid.uuid4()}").status_code == 404
    r = api.get(f"{BASE}/not-a-uuid")
    assert r.status_code == 404 and r.json()["code"] == "not_found"


def test_put_replaces_settings_and_moves_updated_at(api):
    row = make("old", is_favorite=True)
    r = send(
        api,
        "put",
        f"{BASE}/{row.pk}",
        {"name": "new", "layers": [3], "hook_types": ["attention"], "batch_size": 8},
    )
    assert r.status_code == 200
    body = r.json()
    assert (body["name"], body["layers"], body["hook_types"]) == ("new", [3], ["attention"])
    assert body["batch_size"] == 8 and body["is_favorite"] is True  # left out: kept
    fresh = ExtractionTemplate.objects.get()
    assert fresh.updated_at > row.updated_at and fresh.created_at == row.created_at


def test_put_checks_like_create(api):
    row, other = make("a"), make("b")
    r = send(api, "put", f"{BASE}/{row.pk}", {**VALID, "name": "b"})
    assert r.status_code == 409
    r = send(api, "put", f"{BASE}/{row.pk}", {**VALID, "layers": []})
    assert r.status_code == 422 and "at least one layer" in r.json()["detail"]
    r = send(api, "put", f"{BASE}/{row.pk}", {**VALID, "hook_types": []})
    assert r.status_code == 422
    assert send(api, "put", f"{BASE}/{row.pk}", {**VALID, "name": "a"}).status_code == 200
    assert send(api, "put", f"{BASE}/{uuid.uuid4()}", VALID).status_code == 404
    assert ExtractionTemplate.objects.get(pk=other.pk).name == "b"


def test_delete_is_204_then_404(api):
    row = make("gone")
    assert api.delete(f"{BASE}/{row.pk}").status_code == 204
    assert api.get(f"{BASE}/{row.pk}").status_code == 404
    assert api.delete(f"{BASE}/{row.pk}").status_code == 404


def test_favorite_patch_returns_id_flag_and_updated_at(api):
    row = make("star")
    r = send(api, "patch", f"{BASE}/{row.pk}/favorite", {"is_favorite": True})
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"id", "is_favorite", "updated_at"}
    assert body["id"] == str(row.pk) and body["is_favorite"] is True
    assert ExtractionTemplate.objects.get().updated_at > row.updated_at
    assert (
        send(api, "patch", f"{BASE}/{row.pk}/favorite", {"is_favorite": False}).json()[
            "is_favorite"
        ]
        is False
    )
    assert send(api, "patch", f"{BASE}/{row.pk}/favorite", {}).status_code == 422
    assert send(api, "patch", f"{BASE}/{row.pk}/favorite", {"is_favorite": "x"}).status_code == 422
    assert (
        send(api, "patch", f"{BASE}/{uuid.uuid4()}/favorite", {"is_favorite": True}).status_code
        == 404
    )


def test_export_has_the_version_and_every_field(api):
    a, b = make("a", is_favorite=True), make("b")
    r = send(api, "post", "/api/templates/export", b"")  # no body: everything
    assert r.status_code == 200
    body = r.json()
    assert body["version"] == 1 and body["exported_at"].endswith("Z")
    assert [t["name"] for t in body["extraction_templates"]] == ["a", "b"]  # oldest first
    first = body["extraction_templates"][0]
    assert set(first) == FIELDS and first["id"] == str(a.pk) and first["is_favorite"] is True
    only_b = send(api, "post", "/api/templates/export", {"ids": [str(b.pk)]}).json()
    assert [t["name"] for t in only_b["extraction_templates"]] == ["b"]
    seed_body = {"include_training": True, "include_extraction": True, "include_steering": True}
    assert (
        len(send(api, "post", "/api/templates/export", seed_body).json()["extraction_templates"])
        == 2
    )
    assert send(api, "post", "/api/templates/export", {"ids": ["x"]}).status_code == 422


def test_unsafe_methods_need_the_csrf_token():
    strict = Client(enforce_csrf_checks=True)
    before = snapshot()
    assert send(strict, "post", BASE, VALID).status_code == 403
    assert send(strict, "post", "/api/templates/import", {}).status_code == 403
    assert snapshot() == before
    assert strict.get(BASE).status_code == 200


def test_login_required_installs_refuse_anonymous_calls(api, settings):
    settings.LOGIN_REQUIRED = True
    assert api.get(BASE).status_code == 401
    assert send(api, "post", BASE, VALID).status_code == 401


def test_the_routes_are_in_the_openapi_document(api):
    paths = api.get("/api/openapi.json").json()["paths"]
    for route in (
        "/api/templates/extraction",
        "/api/templates/extraction/{template_id}",
        "/api/templates/extraction/{template_id}/favorite",
        "/api/templates/export",
        "/api/templates/import",
    ):
        assert route in paths
