"""Extraction through the JSON API, the modal and history views, and `manage.py extract`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command
from django.urls import reverse
from safetensors.torch import load_file

from datasets_app.models import Dataset
from mistudio.testing.queues import queued_task_payloads
from models_app import tasks
from models_app.consumers import card_html
from models_app.models import ExtractionJob, ExtractionStatus

from .helpers import CORPUS, download, extract, text_dataset

pytestmark = pytest.mark.django_db(transaction=True)
HX = {"HTTP_HX_REQUEST": "true"}


@pytest.fixture
def ready(hub):
    return download("tiny/gpt2", "FP16"), text_dataset()


def post(client, url, data):
    return client.post(url, json.dumps(data), content_type="application/json")


def test_api_start_run_get_list_delete(client, ready):
    model, ds = ready
    r = post(
        client,
        f"/api/models/{model.pk}/extract-activations",
        {
            "dataset_id": ds.pk,
            "layers": [1, 0],
            "hook_types": ["mlp"],
            "batch_size": 4,
            "max_samples": 8,
            "context_size": 16,
        },
    )
    assert r.status_code == 202 and r.json()["status"] == "queued"
    job_id = r.json()["extraction_id"]
    tasks.extraction_run_task(job_id)
    body = client.get(f"/api/extractions/{job_id}").json()
    assert body["status"] == "completed" and body["layers"] == [0, 1]
    assert body["manifest"]["hooks"][0]["shards"] and body["statistics"]
    assert [j["id"] for j in client.get(f"/api/models/{model.pk}/extractions").json()] == [job_id]
    assert client.post(f"/api/extractions/{job_id}/cancel").status_code == 409
    assert client.delete(f"/api/extractions/{job_id}").status_code == 204
    assert client.get(f"/api/extractions/{job_id}").status_code == 404


@pytest.mark.parametrize(
    "bad",
    [
        {"layers": []},
        {"layers": [-1]},
        {"layers": [9]},
        {"hook_types": []},
        {"hook_types": ["embeddings"]},
        {"batch_size": 0},
        {"batch_size": 10**6},
        {"max_samples": 0},
        {"context_size": 1},
        {"context_size": 10**7},
        {"context_size": 1024},
        {"dataset_id": ""},
        {"layers": "0,1"},
    ],
)
def test_api_bad_settings_are_4xx_and_create_nothing(client, ready, bad):
    model, ds = ready
    payload = {"dataset_id": ds.pk, "layers": [0], "hook_types": ["residual"], **bad}
    r = post(client, f"/api/models/{model.pk}/extract-activations", payload)
    assert r.status_code in (400, 422) and r.json()["detail"]
    assert not ExtractionJob.objects.exists()


def test_api_model_not_ready_is_409(client, hub):
    ds = text_dataset()
    r = post(client, "/api/models/download", {"hf_repo_id": "tiny/gpt2", "quantization": "Q8"})
    r = post(
        client,
        f"/api/models/{r.json()['id']}/extract-activations",
        {"dataset_id": ds.pk, "layers": [0], "hook_types": ["residual"]},
    )
    assert r.status_code == 409


def test_modal_is_sized_from_the_model_with_defaults(client, ready):
    model, ds = ready
    body = client.get(reverse("models:extract", args=[model.pk]), **HX).content.decode()
    assert "<html" not in body and "Extract Activations" in body
    assert body.count('name="layers"') == 2 and "L1" in body and "L2" not in body
    assert f'value="{ds.pk}"' in body and "Extraction Templates" in body
    assert (
        client.get(reverse("models:extract", args=[model.pk])).content.decode().count("<html") == 1
    )


def test_loading_a_template_fills_the_modal(client, ready):
    from templates_app.services import template_create

    model, _ = ready
    t = template_create(
        name="mlp-late",
        description="",
        layers=[1],
        hook_types=["mlp"],
        max_samples=77,
        batch_size=5,
        context_size=64,
    )
    url = reverse("models:extract", args=[model.pk]) + f"?template={t.id}&templates=open"
    body = client.get(url, **HX).content.decode()
    assert 'value="77"' in body and 'value="5"' in body and 'value="64"' in body
    assert 'value="1" class="peer sr-only" checked' in body
    assert 'value="0" class="peer sr-only" checked' not in body


def test_start_from_the_modal_shows_its_extracting_box(client, ready):
    model, ds = ready
    data = {
        "dataset_id": ds.pk,
        "layers": ["0", "1"],
        "hook_types": ["residual", "attention"],
        "batch_size": "4",
        "max_samples": "8",
        "context_size": "16",
    }
    r = client.post(reverse("models:extract_start", args=[model.pk]), data, **HX)
    # The box goes into the modal (a target inside it, so it exists whatever page opened it);
    # no header closes the modal first (that made htmx look for the target in a detached tree).
    assert r.status_code == 202 and r.headers["HX-Retarget"] == "#extract-status"
    assert "HX-Trigger" not in r.headers
    job = ExtractionJob.objects.get()
    body = r.content.decode()
    assert f'id="extraction-box-{job.pk}"' in body and "Extracting…" in body
    assert "Extraction Progress" in body and f"{', '.join(job.hook_types)} @ layers 0, 1" in body
    bad = client.post(
        reverse("models:extract_start", args=[model.pk]), {**data, "layers": []}, **HX
    )
    assert bad.status_code == 422 and bad.headers["HX-Retarget"] == "#extract-error"
    assert "Layers" in bad.content.decode()


def test_history_shows_statistics_and_a_histogram(client, ready):
    model, ds = ready
    job = extract(model, ds, hook_types=["residual"], layers=[0])
    page = client.get(reverse("models:extractions", args=[model.pk])).content.decode()
    assert "blocks.0.hook_resid_post" in page and "<svg" in page and "<rect" in page
    assert job.output_path in page
    frag = client.post(reverse("models:extraction_delete", args=[job.pk]), **HX)
    assert frag.status_code == 200 and "No extractions yet" in frag.content.decode()


def test_cli_extracts_from_a_text_file(ready, tmp_path, capsys):
    model, _ = ready
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS))
    out = tmp_path / "acts"
    call_command(
        "extract",
        model="tiny/gpt2",
        dataset=str(corpus),
        layers="0,1",
        hooks="residual,mlp",
        max_samples=6,
        batch_size=3,
        context_size=16,
        out=str(out),
    )
    job = ExtractionJob.objects.get()
    assert job.status == ExtractionStatus.COMPLETED and Path(job.output_path) == out
    shard = load_file(out / "shards" / "blocks.1.hook_mlp_out" / "000000.safetensors")
    assert shard["activations"].shape == (6, 16, 128)
    assert "tok/s" in capsys.readouterr().out
    # the file was normalized by this process (no web request): no task waits for a worker
    assert Dataset.objects.get(pk=job.dataset_id).status == "ready"
    assert (job.dataset_id,) not in [t["args"] for t in queued_task_payloads()]


def test_cli_refuses_a_file_bad_past_its_first_rows_and_keeps_nothing(ready, tmp_path, settings):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(f'{{"text": "{t}"}}\n' for t in CORPUS * 3) + "{broken\n")
    with pytest.raises(CommandError) as err:
        call_command("extract", model="tiny/gpt2", dataset=str(corpus), layers="0", hooks="mlp")
    assert "corpus.jsonl" in str(err.value) and "Line 301" in str(err.value)
    row = Dataset.objects.get(original_filename="corpus.jsonl")
    assert row.status == "error" and not ExtractionJob.objects.exists()
    assert [p.name for p in settings.DATASETS_DIR.iterdir()] == [ready[1].pk]  # nothing kept


def test_cli_uses_a_template(ready):
    from templates_app.services import template_create

    model, ds = ready
    template_create(
        name="t1",
        description="",
        layers=[1],
        hook_types=["attention"],
        max_samples=4,
        batch_size=2,
        context_size=16,
    )
    call_command("extract", model=model.pk, dataset=ds.pk, template="t1")
    job = ExtractionJob.objects.get()
    assert (job.layers, job.hook_types, job.max_samples) == ([1], ["attention"], 4)


def test_cli_takes_a_dataset_by_the_name_the_datasets_page_shows(ready):
    model, ds = ready
    call_command(
        "extract", model=model.pk, dataset=ds.name, layers="0", hooks="residual", max_samples=2
    )
    job = ExtractionJob.objects.get()
    assert job.dataset_id == ds.pk and job.status == ExtractionStatus.COMPLETED


@pytest.mark.parametrize(
    "args",
    [
        {"layers": "0,9", "hooks": "residual"},
        {"layers": "x", "hooks": "residual"},
        {"layers": "0", "hooks": "nope"},
        {"layers": "0", "hooks": "residual", "template": "missing"},
        {"layers": "0", "hooks": "residual", "dataset": "/no/such/file.txt"},
    ],
)
def test_cli_bad_input_exits_with_a_message(ready, args):
    model, ds = ready
    options = {"model": model.pk, "dataset": ds.pk, **args}
    with pytest.raises(CommandError) as err:
        call_command("extract", **options)
    assert str(err.value)
    assert not ExtractionJob.objects.exists()


def test_the_push_carries_the_card_the_modal_box_and_the_history_row(ready):
    """One change of an extraction refreshes every view of it that a page may show: the model's
    card, the open modal's box and the Extractions page's row, each swapped only where present
    (the card and the row also say which list a page adds them to when it lacks them)."""
    model, ds = ready
    job = extract(model, ds)
    html = card_html(model.pk)
    assert html.count('hx-swap-oob="true"') == 3
    assert f'id="model-{model.pk}" hx-swap-oob="true" data-live-list="#model-list"' in html
    assert f'id="extraction-box-{job.pk}" hx-swap-oob="true"' in html
    row = f"data-live-list=\"#extraction-list[data-model='{model.pk}']\""
    assert f'id="extraction-{job.pk}" hx-swap-oob="true" {row}' in html
    assert html.count(f'data-copy="{job.output_path}"') == 2  # card and box: the notice
    running = ExtractionJob.objects.create(
        model=model, dataset=ds, layers=[0], hook_types=["residual"], batch_size=1,
        max_samples=1, context_size=8, status=ExtractionStatus.RUNNING, phase="loading the model",
    )  # fmt: skip
    html = card_html(model.pk)
    assert f'id="extraction-box-{running.pk}"' in html and "Extracting…" in html
    assert "loading the model…" in html and "0.0%" not in html  # words, not a still 0.0%
