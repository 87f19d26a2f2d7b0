"""Export → import is lossless; imports are capped, strict and never half-written."""

from __future__ import annotations

import json
import uuid

import pytest
from django.urls import reverse

from templates_app import services
from templates_app.models import ExtractionTemplate
from templates_app.schemas import IMPORT_MAX_BYTES, IMPORT_MAX_TEMPLATES

from .helpers import VALID, make, send, snapshot

pytestmark = pytest.mark.django_db(transaction=True)
IMPORT = "/api/templates/import"


def export(api) -> dict:
    return send(api, "post", "/api/templates/export", b"").json()


def do_import(api, data, query: str = ""):
    return send(api, "post", IMPORT + query, data)


def a_varied_set() -> None:
    make("plain")
    make("ünïcødé ✓ 模板", description="two\nlines\tand a tab", is_favorite=True)
    make(
        "edges",
        layers=[0, 1023],
        hook_types=["residual", "mlp", "attention"],
        max_samples=100_000_000,
        batch_size=1024,
        context_size=131_072,
        top_k_examples=10_000,
        special_tokens="parse",
        output_format="safetensors+saelens",
    )
    make(
        "x" * 255,
        description="d" * 500,
        layers=list(range(256)),
        max_samples=1,
        batch_size=1,
        context_size=2,
        top_k_examples=1,
    )
    make(
        "every site",
        hook_types=["residual", "mlp", "attention", "resid_pre", "z", "ln_final"],
        module_sites=[
            {"path": "model.layers.3.mlp.down_proj", "io": "input"},
            {"path": "model.layers.3.mlp.down_proj", "io": "output"},
            {"path": "lm_head", "io": "output"},
        ],
    )
    services.template_update(make("edited").pk, description="changed later")


def item(**fields) -> dict:
    return {**VALID, **fields}


def envelope(*items) -> dict:
    return {"version": 1, "exported_at": "2026-01-01T00:00:00Z", "extraction_templates": items}


def test_export_then_import_into_an_empty_database_is_identical(api):
    a_varied_set()
    before = snapshot()
    data = export(api)
    ExtractionTemplate.objects.all().delete()
    r = do_import(api, data)
    assert r.status_code == 200
    assert r.json() == {
        "imported": {"extraction_templates": 6},
        "skipped": {"extraction_templates": 0},
        "errors": [],
    }
    assert snapshot() == before  # ids, timestamps, every setting, the new sites included


def test_a_file_exported_before_the_new_sites_still_imports(api):
    old = {k: v for k, v in item(name="old").items() if k != "module_sites"}
    old["hook_types"] = ["residual", "mlp", "attention"]
    r = do_import(api, envelope(old))
    assert r.status_code == 200 and r.json()["imported"] == {"extraction_templates": 1}
    row = ExtractionTemplate.objects.get(name="old")
    assert row.module_sites == [] and row.hook_types == ["residual", "mlp", "attention"]
    assert row.extraction_settings()["module_sites"] == []


@pytest.mark.parametrize(
    "sites,words",
    [
        ([{"path": "model..layers", "io": "output"}], "dotted module path"),
        ([{"path": "model.norm", "io": "inside"}], "input"),
        ([{"path": "model.norm", "io": "output", "extra": 1}], "extra"),
        ([{"path": "model.norm"}] * 17, "16"),
    ],
)
def test_a_bad_module_site_in_a_file_is_an_item_error(api, sites, words):
    r = do_import(api, envelope(item(name="bad", module_sites=sites)))
    assert r.status_code == 200 and r.json()["imported"] == {"extraction_templates": 0}
    assert words in json.dumps(r.json()["errors"])


def test_the_downloaded_file_round_trips_through_the_modal_import(client):
    a_varied_set()
    before = snapshot()
    r = client.get(reverse("templates:export"))
    assert r.status_code == 200 and r["Content-Type"].startswith("application/json")
    assert r["Content-Disposition"].startswith('attachment; filename="miStudio-templates-20')
    ExtractionTemplate.objects.all().delete()
    upload = {"file": _file(r.content)}
    r = client.post(reverse("templates:import"), upload, HTTP_HX_REQUEST="true")
    assert r.status_code == 200 and snapshot() == before


def _file(content: bytes, name: str = "miStudio-templates.json"):
    from django.core.files.uploadedfile import SimpleUploadedFile

    return SimpleUploadedFile(name, content, content_type="application/json")


def test_importing_twice_skips_everything(api):
    a_varied_set()
    data = export(api)
    before = snapshot()
    r = do_import(api, data)
    assert r.json()["imported"]["extraction_templates"] == 0
    assert r.json()["skipped"]["extraction_templates"] == 6 and r.json()["errors"] == []
    assert snapshot() == before


def test_rename_imports_copies_under_free_names_and_ids(api):
    make("base")
    data = export(api)
    r = do_import(api, data, "?on_conflict=rename")
    assert r.json()["imported"]["extraction_templates"] == 1
    r = do_import(api, data, "?on_conflict=rename")
    names = sorted(ExtractionTemplate.objects.values_list("name", flat=True))
    assert names == ["base", "base (2)", "base (3)"]
    assert ExtractionTemplate.objects.values("pk").distinct().count() == 3


def test_rename_keeps_the_name_when_only_the_id_is_taken(api):
    row = make("kept")
    data = export(api)
    services.template_update(row.pk, name="renamed here")
    do_import(api, data, "?on_conflict=rename")
    copy = ExtractionTemplate.objects.get(name="kept")
    assert copy.pk != row.pk


def test_overwrite_restores_the_file_version(api):
    row = make("mine", batch_size=8)
    before = snapshot()
    data = export(api)
    services.template_update(row.pk, batch_size=64, description="local edit")
    r = do_import(api, data, "?on_conflict=overwrite")
    assert r.json()["imported"]["extraction_templates"] == 1 and snapshot() == before


def test_overwrite_by_name_takes_the_file_id(api):
    make("same name")
    incoming = item(name="same name", id=str(uuid.uuid4()), batch_size=7)
    r = do_import(api, envelope(incoming), "?on_conflict=overwrite")
    assert r.json()["imported"]["extraction_templates"] == 1
    row = ExtractionTemplate.objects.get()
    assert str(row.pk) == incoming["id"] and row.batch_size == 7


def test_overwrite_without_an_id_keeps_the_local_one(api):
    row = make("same name")
    incoming = {k: v for k, v in item(name="same name", batch_size=9).items() if k != "id"}
    do_import(api, envelope(incoming), "?on_conflict=overwrite")
    assert ExtractionTemplate.objects.get().pk == row.pk
    assert ExtractionTemplate.objects.get().batch_size == 9


def test_an_id_and_a_name_of_two_templates_is_an_item_error(api):
    a, _ = make("a"), make("b")
    r = do_import(api, envelope(item(name="b", id=str(a.pk))), "?on_conflict=overwrite")
    body = r.json()
    assert body["imported"]["extraction_templates"] == 0
    assert body["errors"][0]["index"] == 0 and "rename or delete" in body["errors"][0]["reason"]


def test_bad_items_are_reported_by_index_while_good_ones_import(api):
    items = [
        item(name="good 1"),
        item(name=""),
        "not an object",
        item(name="extra key", colour="blue"),
        item(name="naive time", created_at="2026-01-01T00:00:00"),
        item(name="no layers", layers=[]),
        item(name="good 2", id=str(uuid.uuid4())),
        item(name="good 1"),  # same name again in the same file: skipped
    ]
    r = do_import(api, envelope(*items))
    assert r.status_code == 200
    body = r.json()
    assert body["imported"] == {"extraction_templates": 2}
    assert body["skipped"] == {"extraction_templates": 1}
    assert [e["index"] for e in body["errors"]] == [1, 2, 3, 4, 5]
    reasons = [e["reason"] for e in body["errors"]]
    assert "name" in reasons[0].lower() and "object" in reasons[1]
    assert "does not know" in reasons[2] and "colour" not in reasons[2]
    assert "timezone" in reasons[3].lower() and "at least one layer" in reasons[4]
    assert all(e["kind"] == "extraction_templates" for e in body["errors"])
    assert set(ExtractionTemplate.objects.values_list("name", flat=True)) == {"good 1", "good 2"}


def test_a_hand_written_file_without_ids_gets_new_ones(api):
    r = do_import(
        api,
        {
            "version": 1,
            "extraction_templates": [{"name": "hand", "layers": [2], "hook_types": ["mlp"]}],
        },
    )
    assert r.json()["imported"]["extraction_templates"] == 1
    row = ExtractionTemplate.objects.get()
    assert row.top_k_examples == 100 and row.layers == [2]


def _rejected(api, body, query: str = "") -> dict:
    if not ExtractionTemplate.objects.exists():
        make("existing")
    before = snapshot()
    r = do_import(api, body, query)
    assert 400 <= r.status_code < 500, r.content
    assert snapshot() == before
    return {"status": r.status_code, **r.json()}


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        (b"{not json", 400, "not valid JSON"),
        (b"\xff\xfe\x00garbage", 400, "not valid JSON"),
        (b"[" * 100_000, 400, "not valid JSON"),
        (b"1" * 5000, 400, "not valid JSON"),
        (b"[]", 422, "JSON object"),
        (b"null", 422, "JSON object"),
        ({"extraction_templates": []}, 422, "Version"),
        ({"version": 2, "extraction_templates": []}, 422, "version 1"),
        ({"version": "1", "extraction_templates": []}, 422, "version 1"),
        ({"version": True, "extraction_templates": []}, 422, "Version"),
        ({"version": 1}, 422, "extraction_templates"),
        ({"version": 1, "extraction_templates": {"a": 1}}, 422, "extraction_templates"),
        (
            {"version": 1, "extraction_templates": [], "training_templates": []},
            422,
            "does not know",
        ),
        ({"version": 1, "exported_at": "yesterday", "extraction_templates": []}, 422, "Exported"),
        ({"version": 1, "extraction_templates": [{}] * (IMPORT_MAX_TEMPLATES + 1)}, 422, "at most"),
    ],
)
def test_a_file_that_is_not_an_export_is_refused_whole(api, body, status, words):
    if isinstance(body, dict) and body.get("extraction_templates") == []:
        body["extraction_templates"] = [item(name="would be new")]
    result = _rejected(api, body)
    assert result["status"] == status and words.lower() in result["detail"].lower()


def test_an_unknown_conflict_mode_is_refused(api):
    result = _rejected(api, envelope(item(name="new")), "?on_conflict=merge")
    assert result["status"] == 422 and "on_conflict" in result["detail"]


def test_a_file_over_one_megabyte_is_refused_before_parsing(api):
    padding = " " * IMPORT_MAX_BYTES
    result = _rejected(api, json.dumps(envelope(item(name="big"))) + padding)
    assert result["status"] == 413 and "1 MB" in result["detail"]
    result = _rejected(api, b"{" * (3 * IMPORT_MAX_BYTES))  # past Django's own 2 MB limit too
    assert result["status"] == 413


def test_the_size_cap_holds_without_a_content_length(api):
    with pytest.raises(services.TooLarge):
        services.templates_import(raw=b" " * (IMPORT_MAX_BYTES + 1))


def test_a_file_exactly_at_the_cap_is_read(api):
    body = json.dumps(envelope(item(name="fits")))
    body += " " * (IMPORT_MAX_BYTES - len(body.encode()))
    r = do_import(api, body)
    assert r.status_code == 200 and r.json()["imported"]["extraction_templates"] == 1


def test_special_tokens_round_trip_and_older_files_import_with_the_default(api):
    make("chat", special_tokens="parse")
    data = export(api)
    assert data["extraction_templates"][0]["special_tokens"] == "parse"
    ExtractionTemplate.objects.all().delete()
    assert do_import(api, data).status_code == 200
    assert ExtractionTemplate.objects.get().special_tokens == "parse"
    older = {k: v for k, v in data["extraction_templates"][0].items() if k != "special_tokens"}
    ExtractionTemplate.objects.all().delete()
    r = do_import(api, {"version": 1, "extraction_templates": [older]})
    assert r.json()["imported"] == {"extraction_templates": 1}
    assert ExtractionTemplate.objects.get().special_tokens == "text"


def test_an_unknown_special_tokens_value_is_an_item_error(api):
    item = {**VALID, "name": "bad", "special_tokens": "sometimes"}
    r = do_import(api, {"version": 1, "extraction_templates": [item, {**VALID, "name": "ok"}]})
    body = r.json()
    assert body["imported"] == {"extraction_templates": 1}
    assert body["errors"][0]["index"] == 0 and "Special tokens" in body["errors"][0]["reason"]
    assert list(ExtractionTemplate.objects.values_list("name", flat=True)) == ["ok"]


def test_output_format_round_trips_and_older_files_import_as_safetensors(api, client):
    make("for sae", output_format="safetensors+saelens")
    data = export(api)
    assert data["extraction_templates"][0]["output_format"] == "safetensors+saelens"
    ExtractionTemplate.objects.all().delete()
    assert do_import(api, data).status_code == 200
    row = ExtractionTemplate.objects.get()
    assert row.extraction_settings()["output_format"] == "safetensors+saelens"
    older = {k: v for k, v in data["extraction_templates"][0].items() if k != "output_format"}
    ExtractionTemplate.objects.all().delete()
    r = do_import(api, {"version": 1, "extraction_templates": [older]})
    assert r.json()["imported"] == {"extraction_templates": 1}
    assert ExtractionTemplate.objects.get().output_format == "safetensors"
    bad = {**VALID, "name": "bad", "output_format": "hdf5"}
    body = do_import(api, {"version": 1, "extraction_templates": [bad]}).json()
    assert "Output format" in body["errors"][0]["reason"]
    assert ExtractionTemplate.objects.count() == 1
