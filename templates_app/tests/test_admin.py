"""Admin curation: list, search, favourite filter, actions and the import page."""

from __future__ import annotations

import json

import pytest
from django.contrib.messages import get_messages
from django.core.files.uploadedfile import SimpleUploadedFile
from django.urls import reverse

from templates_app.models import ExtractionTemplate

from .helpers import VALID, make, snapshot

pytestmark = pytest.mark.django_db(transaction=True)
CHANGELIST = reverse("admin:templates_app_extractiontemplate_changelist")
IMPORT_PAGE = reverse("admin:templates_app_extractiontemplate_import")
ADD = reverse("admin:templates_app_extractiontemplate_add")


def action(client, name: str, rows) -> object:
    return client.post(CHANGELIST, {"action": name, "_selected_action": [r.pk for r in rows]})


def texts(response) -> list[str]:
    return [str(m) for m in get_messages(response.wsgi_request)]


def test_the_list_shows_layers_hooks_favourite_and_updated(admin_client):
    make("listed", layers=[0, 6, 11], hook_types=["residual", "mlp"], is_favorite=True)
    body = admin_client.get(CHANGELIST).content.decode()
    for text in ("listed", "0, 6, 11", "residual, mlp", "icon-yes.svg", "Updated at", "Import"):
        assert text in body


def test_search_and_the_favourite_filter(admin_client):
    make("alpha", description="the first layers")
    make("beta", description="other", is_favorite=True)
    body = admin_client.get(CHANGELIST, {"q": "first"}).content.decode()
    assert "alpha" in body and "beta" not in body
    body = admin_client.get(CHANGELIST, {"is_favorite__exact": "1"}).content.decode()
    assert "beta" in body and "alpha" not in body


def test_export_selected_downloads_only_those(admin_client):
    a, _, c = make("a"), make("b"), make("c")
    r = action(admin_client, "export_selected", [a, c])
    assert r.status_code == 200 and "miStudio-templates-" in r["Content-Disposition"]
    data = json.loads(r.content)
    assert data["version"] == 1
    assert sorted(t["name"] for t in data["extraction_templates"]) == ["a", "c"]


def test_duplicate_makes_free_named_copies(admin_client):
    row = make("orig", is_favorite=True)
    action(admin_client, "duplicate_selected", [row])
    r = action(admin_client, "duplicate_selected", [row])
    assert "Duplicated 1 template(s)." in texts(r)
    copies = ExtractionTemplate.objects.exclude(pk=row.pk).order_by("name")
    assert [c.name for c in copies] == ["orig (2)", "orig (copy)"]
    assert all(c.layers == row.layers and not c.is_favorite for c in copies)


def test_toggle_favourite_flips_each(admin_client):
    on, off = make("on", is_favorite=True), make("off")
    action(admin_client, "toggle_favorite", [on, off])
    assert not ExtractionTemplate.objects.get(pk=on.pk).is_favorite
    assert ExtractionTemplate.objects.get(pk=off.pk).is_favorite


def test_the_add_form_uses_the_same_rules_as_the_api(admin_client):
    form = {
        "name": "from admin",
        "description": "",
        "layers": "[11, 0, 0]",
        "hook_types": '["mlp"]',
        "max_samples": 10,
        "batch_size": 4,
        "context_size": 32,
        "top_k_examples": 100,
    }
    r = admin_client.post(ADD, {**form, "layers": "[]"})
    assert r.status_code == 200 and "Pick at least one layer." in r.content.decode()
    r = admin_client.post(ADD, {**form, "hook_types": '["everything"]'})
    assert r.status_code == 200 and "Hook types" in r.content.decode()
    r = admin_client.post(ADD, {**form, "batch_size": 5000})
    assert r.status_code == 200 and "Batch size must be between" in r.content.decode()
    assert ExtractionTemplate.objects.count() == 0
    assert admin_client.post(ADD, form).status_code == 302
    assert ExtractionTemplate.objects.get().layers == [0, 11]
    assert ExtractionTemplate.objects.get().output_format == "safetensors"  # left out: default


def test_the_admin_form_offers_the_output_format(admin_client):
    assert 'name="output_format"' in admin_client.get(ADD).content.decode()
    form = {"name": "sae", "description": "", "layers": "[1]", "hook_types": '["residual"]',
            "max_samples": 10, "batch_size": 4, "context_size": 32, "top_k_examples": 100,
            "output_format": "safetensors+saelens"}  # fmt: skip
    r = admin_client.post(ADD, {**form, "output_format": "zarr"})
    assert r.status_code == 200 and ExtractionTemplate.objects.count() == 0
    assert admin_client.post(ADD, form).status_code == 302
    assert ExtractionTemplate.objects.get().output_format == "safetensors+saelens"


def upload(content: bytes) -> SimpleUploadedFile:
    return SimpleUploadedFile("templates.json", content, content_type="application/json")


def test_the_import_page_imports_and_reports(admin_client):
    assert "Import extraction templates" in admin_client.get(IMPORT_PAGE).content.decode()
    make("here")
    items = [{**VALID, "name": "new"}, {**VALID, "name": "here"}, {**VALID, "hook_types": []}]
    data = json.dumps({"version": 1, "extraction_templates": items}).encode()
    r = admin_client.post(IMPORT_PAGE, {"file": upload(data), "on_conflict": "skip"})
    assert r.status_code == 302 and r["Location"] == CHANGELIST
    messages = texts(r)
    assert "Imported 1, skipped 1, 1 error(s)." in messages
    assert any(m.startswith("Template #2: Pick at least one hook type") for m in messages)
    r = admin_client.post(IMPORT_PAGE, {"file": upload(data), "on_conflict": "rename"})
    assert ExtractionTemplate.objects.filter(name__startswith="here").count() == 2


def test_a_bad_file_on_the_import_page_changes_nothing(admin_client):
    make("kept")
    before = snapshot()
    r = admin_client.post(IMPORT_PAGE, {"file": upload(b"{oops"), "on_conflict": "skip"})
    assert r.status_code == 400 and "not valid JSON" in r.content.decode()
    r = admin_client.post(IMPORT_PAGE, {"on_conflict": "skip"})
    assert r.status_code == 400
    r = admin_client.post(IMPORT_PAGE, {"file": upload(b"{}"), "on_conflict": "merge"})
    assert r.status_code == 400
    assert snapshot() == before


def test_only_staff_reach_the_import_page(client, django_user_model):
    assert client.get(IMPORT_PAGE).status_code == 302
    user = django_user_model.objects.create_user("plain", password="pw-12345-long")
    client.force_login(user)
    assert client.get(IMPORT_PAGE).status_code == 302  # not staff: the admin login


def test_a_template_saved_in_the_modal_shows_in_the_admin(admin_client):
    form = {
        "layers": ["2", "4"],
        "hook_types": ["attention"],
        "batch_size": "8",
        "max_samples": "64",
        "context_size": "32",
        "name": "from the modal",
    }
    r = admin_client.post(reverse("templates:save"), form, HTTP_HX_REQUEST="true")
    assert r.status_code == 201
    body = admin_client.get(CHANGELIST).content.decode()
    assert "from the modal" in body and "2, 4" in body and "attention" in body
