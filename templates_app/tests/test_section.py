"""The "Extraction Templates" section of the extraction modal: HTMX fragments through Django's
client, and the modal itself filled from a template."""

from __future__ import annotations

import json
import re

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.urls import reverse

from models_app.models import Model, ModelStatus
from templates_app import selectors, services
from templates_app.models import ExtractionTemplate
from templates_app.schemas import IMPORT_MAX_BYTES

from .helpers import VALID, make, snapshot

pytestmark = pytest.mark.django_db(transaction=True)
HX = {"HTTP_HX_REQUEST": "true"}
FORM = {
    "dataset_id": "d_1",
    "layers": ["0", "6", "11"],
    "hook_types": ["residual", "mlp"],
    "batch_size": "16",
    "max_samples": "500",
    "context_size": "64",
    "name": "",
    "description": "",
}


@pytest.fixture
def model() -> Model:
    return Model.objects.create(
        name="gpt2",
        hf_repo_id="tiny/gpt2",
        quantization="FP16",
        status=ModelStatus.READY,
        num_layers=12,
        hidden_dim=64,
        max_position=1024,
        progress=100,
    )


def rows(body: str) -> list[str]:
    return re.findall(r'class="template-name[^"]*" title="[^"]*">([^<]*)<', body)


def is_open(body: str) -> bool:
    return bool(re.search(r'<details id="templates-section"[^>]*\sopen[\s>]', body))


def save(client, model=None, **fields):
    data = {**FORM, "model_id": model.pk if model else "", **fields}
    return client.post(reverse("templates:save"), data, **HX)


def test_the_section_fragment_starts_empty(client, model):
    r = client.get(reverse("templates:section"), {"model_id": model.pk}, **HX)
    body = r.content.decode()
    assert r.status_code == 200 and "<html" not in body
    assert 'id="templates-section"' in body and "Extraction Templates (0)" in body
    assert "No templates saved yet" in body and "Export All" in body and "Import" in body
    assert 'hx-include="#extract-form' in body and is_open(body)


def test_saving_the_current_config_adds_a_row(client, model):
    r = save(client, model, name="my config", description="for SAE runs")
    assert r.status_code == 201
    body = r.content.decode()
    assert "Extraction Templates (1)" in body and rows(body) == ["my config"]
    assert "Saved template “my config”" in body and "3 layers • residual, mlp • 500 samples" in body
    row = ExtractionTemplate.objects.get()
    assert (row.layers, row.hook_types) == ([0, 6, 11], ["residual", "mlp"])
    assert (row.batch_size, row.max_samples, row.context_size) == (16, 500, 64)
    assert row.description == "for SAE runs" and row.top_k_examples == 100


def test_saving_keeps_the_special_tokens_policy_of_the_modal(client, model):
    assert save(client, model, name="plain").status_code == 201
    r = save(client, model, name="chat", special_tokens="parse")
    assert r.status_code == 201 and "500 samples • special tokens parsed" in r.content.decode()
    policies = dict(ExtractionTemplate.objects.values_list("name", "special_tokens"))
    assert policies == {"plain": "text", "chat": "parse"}
    bad = save(client, model, name="odd", special_tokens="sometimes")
    assert bad.status_code == 422 and "Special tokens" in bad.content.decode()
    assert ExtractionTemplate.objects.count() == 2


@pytest.mark.parametrize(
    ("fields", "pattern"),
    [
        ({}, r"^residual_mlp_layers0-11_500samples_\d{4}$"),
        ({"layers": ["3"], "hook_types": ["attention"]}, r"^attention_layer3_500samples_\d{4}$"),
    ],
)
def test_a_blank_name_becomes_the_auto_generated_one(client, model, fields, pattern):
    assert save(client, model, **fields).status_code == 201
    assert re.match(pattern, ExtractionTemplate.objects.get().name)


@pytest.mark.parametrize(
    ("fields", "status", "words"),
    [
        ({"layers": []}, 422, "Pick at least one layer"),
        ({"hook_types": []}, 422, "at least one hook type"),
        ({"batch_size": "0"}, 422, "Batch size must be between 1 and 1,024"),
        ({"max_samples": "lots"}, 422, "Max samples"),
        ({"name": "x" * 256}, 422, "at most 255"),
    ],
)
def test_save_errors_are_4xx_fragments_in_the_error_slot(client, model, fields, status, words):
    r = save(client, model, **fields)
    assert r.status_code == status and words in r.content.decode()
    assert r["HX-Retarget"] == "#templates-error" and r["HX-Reswap"] == "innerHTML"
    assert ExtractionTemplate.objects.count() == 0


def test_saving_a_taken_name_is_409(client, model):
    make("taken")
    r = save(client, model, name="taken")
    assert r.status_code == 409 and "already exists" in r.content.decode()
    assert ExtractionTemplate.objects.count() == 1


def test_favourites_come_first_then_newest(client, model):
    make("old fav", is_favorite=True)
    make("older")
    make("newest")
    body = client.get(reverse("templates:section"), {"model_id": model.pk}, **HX).content.decode()
    assert rows(body) == ["old fav", "newest", "older"]
    assert [t.name for t in selectors.section_context(False)["templates"]] == rows(body)


def test_the_star_toggles_the_favourite_and_reorders(client, model):
    make("a")
    b = make("b")
    make("c")
    r = client.post(
        reverse("templates:favorite", args=[b.pk]),
        {"is_favorite": "true", "model_id": model.pk},
        **HX,
    )
    body = r.content.decode()
    assert r.status_code == 200 and rows(body) == ["b", "c", "a"]
    assert body.count("fill-yellow-400") == 1 and 'aria-pressed="true"' in body
    assert '"is_favorite": "false"' in body  # the star now unsets it
    assert ExtractionTemplate.objects.get(pk=b.pk).is_favorite
    client.post(reverse("templates:favorite", args=[b.pk]), {"is_favorite": "false"}, **HX)
    assert not ExtractionTemplate.objects.get(pk=b.pk).is_favorite


def test_delete_removes_the_row_and_asks_first(client, model):
    row = make("doomed")
    body = client.get(reverse("templates:section"), {"model_id": model.pk}, **HX).content.decode()
    assert 'hx-confirm="Delete template “doomed”? This cannot be undone."' in body
    r = client.post(reverse("templates:delete", args=[row.pk]), {"model_id": model.pk}, **HX)
    assert r.status_code == 200 and "No templates saved yet" in r.content.decode()
    r = client.post(reverse("templates:delete", args=[row.pk]), **HX)
    assert r.status_code == 404 and r["HX-Retarget"] == "#templates-error"


def test_load_links_reopen_the_modal_with_the_template(client, model):
    row = make("loadable")
    body = client.get(reverse("templates:section"), {"model_id": model.pk}, **HX).content.decode()
    url = f"{reverse('models:extract', args=[model.pk])}?template={row.pk}&amp;templates=open"
    assert f'hx-get="{url}"' in body and 'hx-target="#modal"' in body
    no_model = client.get(reverse("templates:section"), **HX).content.decode()
    assert "template-load" not in no_model and rows(no_model) == ["loadable"]


def test_loading_a_template_fills_the_extraction_form(client, model):
    row = make(
        "five",
        layers=[1, 5],
        hook_types=["mlp", "attention"],
        batch_size=8,
        max_samples=250,
        context_size=96,
    )
    url = reverse("models:extract", args=[model.pk])
    body = client.get(url, {"template": str(row.pk), "templates": "open"}, **HX).content.decode()
    checked = re.findall(r'name="(layers|hook_types)" value="([^"]+)"[^>]*checked', body)
    assert checked == [
        ("layers", "1"),
        ("layers", "5"),
        ("hook_types", "mlp"),
        ("hook_types", "attention"),
    ]
    assert 'name="batch_size"' in body and 'value="8"' in body and 'value="250"' in body
    assert 'value="96"' in body
    assert is_open(body)
    assert "ring-emerald-500" in body  # the loaded row is marked


def test_export_all_downloads_a_dated_json_file(client):
    make("a")
    r = client.get(reverse("templates:export"))
    assert r.status_code == 200
    assert re.fullmatch(
        r'attachment; filename="miStudio-templates-\d{4}-\d{2}-\d{2}\.json"',
        r["Content-Disposition"],
    )
    data = json.loads(r.content)
    assert data["version"] == 1 and data["extraction_templates"][0]["name"] == "a"


def upload(content: bytes, name: str = "t.json") -> SimpleUploadedFile:
    return SimpleUploadedFile(name, content, content_type="application/json")


def test_import_shows_a_summary_with_errors_by_index(client, model):
    make("already here")
    items = [
        {**VALID, "name": "new one"},
        {**VALID, "name": "already here"},
        {**VALID, "name": "bad", "layers": []},
    ]
    data = json.dumps({"version": 1, "extraction_templates": items}).encode()
    r = client.post(reverse("templates:import"), {"file": upload(data), "model_id": model.pk}, **HX)
    body = r.content.decode()
    assert r.status_code == 200 and 'id="templates-import-summary"' in body
    assert re.search(r'data-count="imported">1<', body) and re.search(
        r'data-count="skipped">1<', body
    )
    assert re.search(r'data-count="errors">1<', body)
    assert "Template #2: Pick at least one layer." in body
    assert "Extraction Templates (2)" in body


@pytest.mark.parametrize(
    ("content", "status", "words"),
    [
        (None, 400, "Choose a .json file"),
        (b"not json", 400, "not valid JSON"),
        (b'{"version": 9, "extraction_templates": []}', 422, "version 1"),
        (b" " * (IMPORT_MAX_BYTES + 1), 413, "over 1 MB"),
    ],
)
def test_a_refused_import_file_changes_nothing(client, content, status, words):
    make("existing")
    before = snapshot()
    data = {"file": upload(content)} if content is not None else {}
    r = client.post(reverse("templates:import"), data, **HX)
    assert r.status_code == status and words in r.content.decode()
    assert r["HX-Retarget"] == "#templates-error" and snapshot() == before


def test_plain_posts_without_htmx_go_back_to_the_page(client, model):
    r = client.post(reverse("templates:save"), {**FORM, "name": "plain"})
    assert r.status_code == 302 and ExtractionTemplate.objects.filter(name="plain").exists()


def test_services_template_get_is_what_the_modal_calls(model):
    row = make("via service")
    assert services.template_get(str(row.pk)).name == "via service"


@pytest.mark.parametrize(
    ("layers", "kept", "says"),
    [
        ([1, 5, 12, 14], ["1", "5"], "names layers L12, L14, which gpt2 does not have (12 layers"),
        ([3, 20], ["3"], "names layer L20, which gpt2 does not have (12 layers: L0–L11); dropped."),
        ([12, 13], ["0", "6", "11"], "none is left, so the default layers are selected."),
    ],
)
def test_a_template_with_layers_the_model_lacks_says_which_were_dropped(
    client, model, layers, kept, says
):
    row = make("deep", layers=layers)
    url = reverse("models:extract", args=[model.pk])
    body = client.get(url, {"template": str(row.pk)}, **HX).content.decode()
    assert re.findall(r'name="layers" value="(\d+)"[^>]*checked', body) == kept
    assert 'class="template-notes' in body and says in body


def test_a_template_longer_than_the_model_says_the_context_was_cut(client, model):
    Model.objects.filter(pk=model.pk).update(max_position=64)
    row = make("long", context_size=512)
    url = reverse("models:extract", args=[model.pk])
    body = client.get(url, {"template": str(row.pk)}, **HX).content.decode()
    assert "Context size 512 is longer than gpt2&#x27;s 64 positions; set to 64." in body
    fitting = make("fits", layers=[0, 1], context_size=32)
    body = client.get(url, {"template": str(fitting.pk)}, **HX).content.decode()
    assert "template-notes" not in body  # nothing to say when everything fits


@pytest.mark.parametrize(
    ("choice", "names", "counts"),
    [
        ("skip", ["already here"], (0, 1)),
        ("rename", ["already here", "already here (2)"], (1, 0)),
        ("overwrite", ["already here"], (1, 0)),
    ],
)
def test_the_modal_import_offers_skip_rename_and_overwrite(client, model, choice, names, counts):
    make("already here", description="old")
    body = client.get(reverse("templates:section"), {"model_id": model.pk}, **HX).content.decode()
    for value in ("skip", "rename", "overwrite"):
        assert f'<option value="{value}"' in body
    items = [{**VALID, "name": "already here", "description": "from the file"}]
    data = json.dumps({"version": 1, "extraction_templates": items}).encode()
    post = {"file": upload(data), "model_id": model.pk, "on_conflict": choice}
    r = client.post(reverse("templates:import"), post, **HX)
    body = r.content.decode()
    imported, skipped = counts
    assert re.search(rf'data-count="imported">{imported}<', body)
    assert re.search(rf'data-count="skipped">{skipped}<', body)
    assert sorted(ExtractionTemplate.objects.values_list("name", flat=True)) == names
    assert f'<option value="{choice}" selected>' in body  # the choice stays for the next import
    descriptions = set(ExtractionTemplate.objects.values_list("description", flat=True))
    assert ("from the file" in descriptions) == (choice != "skip")
