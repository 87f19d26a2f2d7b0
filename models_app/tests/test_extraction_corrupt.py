"""An extraction whose files were damaged after it completed (truncated or missing shard, a
manifest that is `{}`, a JSON list or not JSON): every route that reads them answers a clear
message (4xx, or a failed export with the reason), never a 500."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from django.urls import reverse

from models_app import tasks
from models_app.models import ExtractionExport

from .helpers import download, extract, text_dataset

pytestmark = pytest.mark.django_db(transaction=True)
HX = {"HTTP_HX_REQUEST": "true"}
SHARDS = ["truncated shard", "missing shard"]
MANIFESTS = {"empty manifest": "{}", "list manifest": "[1, 2]", "not json": "{not json"}


@pytest.fixture
def job(hub):
    model = download("tiny/llama", "FP16")
    return extract(model, text_dataset(), hook_types=["residual"], layers=[0], max_samples=4,
                   context_size=16)  # fmt: skip


def _damage(job, how: str) -> str:
    """Damage the extraction's files as `how` says; return the file the messages must name."""
    out = Path(job.output_path)
    if how in MANIFESTS:
        (out / "manifest.json").write_text(MANIFESTS[how])
        return "manifest.json"
    shard = job.manifest["hooks"][0]["shards"][0]["file"]
    if how == "truncated shard":
        (out / shard).write_bytes((out / shard).read_bytes()[:500])
    else:
        (out / shard).unlink()
    return shard


@pytest.mark.parametrize("how", [*SHARDS, *MANIFESTS])
def test_every_route_answers_a_damaged_extraction_with_its_reason(client, job, how):
    named = _damage(job, how)
    tokens = reverse("models:extraction_tokens", args=[job.pk])
    for headers in ({}, HX):
        r = client.get(tokens, **headers)
        assert r.status_code == 422 and named in r.content.decode(), (how, r.content)
    page = client.get(reverse("models:extractions", args=[job.model_id]))
    assert page.status_code == 200 and job.pk in page.content.decode()  # the chart: from the DB
    detail = client.get(f"/api/extractions/{job.pk}")
    assert detail.status_code == 200 and detail.json()["status"] == "completed"
    export = client.post(reverse("models:extraction_export", args=[job.pk]))
    api_export = client.post(f"/api/extractions/{job.pk}/export", "{}",
                             content_type="application/json")  # fmt: skip
    if how in MANIFESTS:  # refused before anything is queued
        assert export.status_code == 422 and named in export.content.decode(), export.content
        assert api_export.status_code == 422 and named in api_export.json()["detail"]
        assert not ExtractionExport.objects.filter(pk=job.pk).exists()
        return
    # a shard is read only by the export itself: queued, then failed with the reason, no folder
    assert export.status_code == 202, export.content
    assert api_export.status_code == 409
    tasks.extraction_export_task(job.pk)
    row = ExtractionExport.objects.get(pk=job.pk)
    assert row.status == "failed" and named in row.error_message, row.error_message
    assert not (Path(job.output_path) / "saelens").exists()
    assert json.loads(client.get(f"/api/extractions/{job.pk}").content)["export"]["status"] == (
        "failed"
    )
