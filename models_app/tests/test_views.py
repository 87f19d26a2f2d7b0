"""The Models panel through Django's client: pages for plain requests, fragments for HTMX."""

from __future__ import annotations

import re

import pytest
from django.urls import reverse

from models_app.models import Model, ModelStatus

from .helpers import download

pytestmark = pytest.mark.django_db(transaction=True)
HX = {"HTTP_HX_REQUEST": "true"}


def test_the_page_shows_the_shell_form_and_empty_state(client):
    page = client.get(reverse("models:page")).content.decode()
    assert "<html" in page and "MechInterp Studio" in page
    assert 'id="model-quantization"' in page and 'value="Q4" selected' in page
    assert "No models yet" in page and 'ws-connect="/ws/models/"' in page


def test_htmx_requests_get_the_section_fragment(client):
    body = client.get(reverse("models:page"), **HX).content.decode()
    assert "<html" not in body and 'id="model-section"' in body


def test_root_redirects_to_models(client):
    assert client.get("/").headers["Location"] == reverse("models:page")


def test_htmx_download_returns_the_new_card(client, hub):
    r = client.post(
        reverse("models:download"), {"hf_repo_id": "tiny/gpt2", "quantization": "Q8"}, **HX
    )
    assert r.status_code == 201
    row = Model.objects.get()
    body = r.content.decode()
    assert f'id="model-{row.pk}"' in body and "<html" not in body and "Queued" in body.title()


def test_plain_download_redirects_to_the_page(client, hub):
    r = client.post(reverse("models:download"), {"hf_repo_id": "tiny/gpt2", "quantization": "Q4"})
    assert r.status_code == 302 and Model.objects.count() == 1


@pytest.mark.parametrize("bad", ["../x", "https://huggingface.co/gpt2", "x" * 200, "ünïcode/m", ""])
def test_bad_repo_ids_get_a_4xx_message_and_change_nothing(client, hub, bad):
    r = client.post(reverse("models:download"), {"hf_repo_id": bad, "quantization": "Q4"}, **HX)
    assert 400 <= r.status_code < 500
    assert r.headers["HX-Retarget"] == "#download-error" and "Repository:" in r.content.decode()
    plain = client.post(reverse("models:download"), {"hf_repo_id": bad, "quantization": "Q4"})
    assert 400 <= plain.status_code < 500 and "<html" in plain.content.decode()
    assert Model.objects.count() == 0


def test_an_unknown_quantization_is_refused(client, hub):
    r = client.post(
        reverse("models:download"), {"hf_repo_id": "tiny/gpt2", "quantization": "Q3"}, **HX
    )
    assert r.status_code == 422 and "Quantization" in r.content.decode()


def test_gated_repo_message_reaches_the_form(client, hub):
    r = client.post(
        reverse("models:download"), {"hf_repo_id": "tiny/gated-llama", "quantization": "Q4"}, **HX
    )
    assert r.status_code == 403 and "accept the licence" in r.content.decode()


def test_estimate_shows_each_quantization_with_a_fit_badge(client, hub):
    r = client.post(reverse("models:estimate"), {"hf_repo_id": "tiny/llama"}, **HX)
    body = r.content.decode()
    assert r.status_code == 200
    for q in ("FP16", "Q8", "Q4", "Q2"):
        assert f'data-quantization="{q}"' in body
    assert "Fits" in body


@pytest.mark.parametrize("typed", ["", "   "])
def test_an_emptied_repo_field_clears_the_estimate_without_an_error(client, hub, typed):
    """Deleting what was typed, or the download clearing the field while a keystroke's estimate
    still waited, asks for an estimate of nothing: the box empties, no refusal."""
    r = client.post(reverse("models:estimate"), {"hf_repo_id": typed, "quantization": "Q4"}, **HX)
    assert (r.status_code, r.content) == (200, b"")
    bad = client.post(reverse("models:estimate"), {"hf_repo_id": "not a repo!"}, **HX)
    assert bad.status_code == 422  # a malformed id is still refused


def test_the_estimate_tile_of_the_chosen_quantization_stands_out(client, hub):
    data = {"hf_repo_id": "tiny/llama", "quantization": "Q2"}
    body = client.post(reverse("models:estimate"), data, **HX).content.decode()
    tiles = re.findall(r'<div class="estimate-row([^"]*)" data-quantization="(\w+)"', body)
    assert [q for cls, q in tiles if "ring-2" in cls] == ["Q2"] and len(tiles) == 4


def test_cards_show_progress_error_and_actions(client, hub):
    row = Model.objects.create(
        name="m",
        hf_repo_id="o/m",
        quantization="Q4",
        status=ModelStatus.DOWNLOADING,
        progress=42.5,
        bytes_done=425,
        bytes_total=1000,
        speed_bps=100,
        eta_seconds=6,
    )
    body = client.get(reverse("models:card", args=[row.pk]), **HX).content.decode()
    assert "42.5%" in body and "Download Progress" in body and "Cancel" in body
    assert "ETA 6 s" in body
    Model.objects.filter(pk=row.pk).update(status=ModelStatus.ERROR, error_message="boom happened")
    body = client.get(reverse("models:card", args=[row.pk]), **HX).content.decode()
    assert "boom happened" in body and "hx-confirm" in body


def test_cancel_and_delete_through_the_page(client, hub):
    client.post(reverse("models:download"), {"hf_repo_id": "tiny/gpt2", "quantization": "Q4"})
    row = Model.objects.get()
    r = client.post(reverse("models:cancel", args=[row.pk]), **HX)
    assert r.status_code == 200 and 'data-status="cancelled"' in r.content.decode()
    r = client.post(reverse("models:delete", args=[row.pk]), **HX)
    assert r.status_code == 200 and "No models yet" in r.content.decode()


def test_cancel_of_a_finished_model_is_a_409_message(client, hub):
    row = download("tiny/gpt2", "FP16")
    r = client.post(reverse("models:cancel", args=[row.pk]), **HX)
    assert r.status_code == 409 and "nothing to cancel" in r.content.decode()


def test_architecture_modal_fragment_and_page(client, hub):
    row = download("tiny/gpt2", "Q4")
    frag = client.get(reverse("models:architecture", args=[row.pk]), **HX).content.decode()
    assert "<html" not in frag and "Architecture" in frag and 'aria-label="Close"' in frag
    assert 'data-stat="total_layers">2<' in frag and 'data-stat="hidden_dimension">128<' in frag
    assert "TransformerBlock_1" in frag and "Embedding" in frag and "GPT2LMHeadModel" in frag
    page = client.get(reverse("models:architecture", args=[row.pk])).content.decode()
    assert "<html" in page and "TransformerBlock_0" in page


def test_unknown_model_is_404_not_500(client):
    assert client.get(reverse("models:architecture", args=["m_nope"]), **HX).status_code == 404
    assert client.post(reverse("models:delete", args=["m_nope"]), **HX).status_code == 404


def test_device_badge_names_the_real_device(client):
    body = client.get(reverse("models:device"), **HX).content.decode()
    assert "CPU" in body or "CUDA" in body


def test_cards_are_listed_newest_first(client):
    names = [f"model-{i}" for i in range(4)]
    for name in names:
        Model.objects.create(name=name, hf_repo_id=f"o/{name}", quantization="Q4")
    page = client.get(reverse("models:page")).content.decode()
    positions = [page.index(f"o/{name}") for name in names]
    assert positions == sorted(positions, reverse=True)


@pytest.mark.parametrize(
    "name", ["architecture", "extractions", "extract", "unload", "load", "cancel", "delete"]
)
def test_card_action_urls_match_the_url_patterns(name):
    row = Model(pk="m_abc", name="m", hf_repo_id="o/m", quantization="Q4")
    assert row.url_base + name == reverse(f"models:{name}", args=[row.pk])
