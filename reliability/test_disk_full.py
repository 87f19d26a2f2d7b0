"""A small data disk: the preflight refuses a download or an extraction that cannot fit, and a
disk that fills during a download, an extraction or a dataset import ends the job with a clear
message, removes its partial files and leaves the app serving pages."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client

from datasets_app import services as dataset_services
from datasets_app import storage as dataset_storage
from datasets_app.tests.helpers import worker_ended
from models_app import extraction, tasks
from models_app.models import ExtractionJob, Model
from models_app.tests.helpers import CORPUS, download, in_thread, text_dataset

from .conftest import FIGURES
from .helpers import partial_model_files

pytestmark = pytest.mark.django_db(transaction=True)

CHUNK = 64 * 1024


def fill(disk: Path, leave: int = 0) -> Path:
    """Fill `disk` up, then give back `leave` bytes; return the filler file."""
    filler = disk / "filler"
    with open(filler, "wb") as out:
        try:
            while True:
                out.write(b"\0" * CHUNK)
                out.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    size = filler.stat().st_size
    os.truncate(filler, max(size - leave, 0))
    return filler


def post(client: Client, path: str, body: dict):
    return client.post(path, json.dumps(body), content_type="application/json")


def serves_pages(client: Client) -> bool:
    return all(client.get(p).status_code == 200 for p in ("/models/", "/datasets/", "/api/models"))


def test_a_download_that_cannot_fit_is_refused_before_any_byte(hub, settings, small_disk):
    settings.MODELS_CACHE_DIR = small_disk
    client = Client()
    r = post(client, "/api/models/download", {"hf_repo_id": "tiny/llama-big", "quantization": "Q4"})
    assert r.status_code == 422 and r.json()["code"] == "disk_full", r.content
    assert "Not enough disk space" in r.json()["detail"] and not Model.objects.exists()
    FIGURES["disk-full refusals before any byte"] += 1


def test_an_extraction_that_cannot_fit_is_refused_before_it_starts(hub, settings, small_disk):
    model = download("tiny/llama")
    settings.ACTIVATIONS_DIR = small_disk
    # enough text for 500 sequences: the disk check is bounded by what the dataset can give
    dataset = text_dataset("long", CORPUS * 10)
    body = {"dataset_id": dataset.pk, "layers": [0, 1], "hook_types": ["residual"]}
    r = post(Client(), f"/api/models/{model.pk}/extract-activations", {**body, "max_samples": 500})
    assert r.status_code == 422 and r.json()["code"] == "disk_full", r.content
    assert not ExtractionJob.objects.exists()
    FIGURES["disk-full refusals before any byte"] += 1


def test_a_disk_that_fills_mid_download_ends_the_job_cleanly(hub, settings, small_disk):
    settings.MODELS_CACHE_DIR = small_disk
    client = Client()
    hub.pause(after_bytes=256 * 1024)  # the weights stop a quarter in
    r = post(client, "/api/models/download", {"hf_repo_id": "tiny/llama", "quantization": "FP16"})
    pk = r.json()["id"]
    worker = in_thread(tasks.model_download_task, pk)
    assert hub.wait_until_held(1, timeout=300)
    filler = fill(small_disk)
    hub.resume()
    worker.join(timeout=300)
    row = Model.objects.get(pk=pk)
    assert (row.status, row.error_message) == ("error", "The disk filled up during the download.")
    assert partial_model_files("tiny/llama") == [] and serves_pages(client)
    filler.unlink()
    assert client.delete(f"/api/models/{pk}").status_code == 204
    assert download("tiny/llama").status == "ready"
    FIGURES["jobs ended cleanly by a disk that filled up"] += 1


def _extraction(model, dataset):
    return extraction.extraction_start(
        model_id=model.pk,
        dataset_id=dataset.pk,
        layers=[0, 1],
        hook_types=["residual", "mlp", "attention"],
        batch_size=4,
        max_samples=12,
        context_size=32,
    )  # six shards of 196 KiB


def test_a_disk_that_fills_mid_extraction_ends_the_job_cleanly(hub, settings, small_disk):
    model, dataset = download("tiny/llama"), text_dataset()
    settings.ACTIVATIONS_DIR = small_disk
    job = _extraction(model, dataset)
    filler = fill(small_disk, leave=500 * 1024)  # two shards fit, the third does not
    tasks.extraction_run_task(job.pk)
    job.refresh_from_db()
    assert job.status == "failed" and job.error_message.startswith("The disk filled up while")
    assert str(small_disk) in job.error_message
    assert "Partial files were removed" in job.error_message
    assert not Path(job.output_path).exists() and serves_pages(Client())
    filler.unlink()
    again = _extraction(model, dataset)
    tasks.extraction_run_task(again.pk)
    assert ExtractionJob.objects.get(pk=again.pk).status == "completed"
    FIGURES["jobs ended cleanly by a disk that filled up"] += 1


def test_a_disk_that_fills_while_the_saelens_folder_is_written_ends_the_job_cleanly(
    hub, settings, small_disk
):
    model, dataset = download("tiny/llama"), text_dataset()
    settings.ACTIVATIONS_DIR = small_disk
    job = extraction.extraction_start(
        model_id=model.pk, dataset_id=dataset.pk, layers=[0, 1],
        hook_types=["residual", "mlp", "attention"], batch_size=4, max_samples=12,
        context_size=32, output_format="safetensors+saelens",
    )  # fmt: skip
    filler = fill(small_disk, leave=1800 * 1024)  # the shards (1.2 MB) fit, the SAELens copy not
    tasks.extraction_run_task(job.pk)
    job.refresh_from_db()
    assert job.status == "failed" and job.error_message.startswith("The disk filled up while")
    assert not Path(job.output_path).exists() and serves_pages(Client())
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]  # no work files either
    filler.unlink()
    FIGURES["jobs ended cleanly by a disk that filled up"] += 1


def test_a_disk_that_fills_mid_dataset_import_ends_the_job_cleanly(settings, small_disk):
    settings.DATASETS_DIR = small_disk
    lines = b"".join(b"a line of text number %d for the import\n" % i for i in range(8000))
    row = dataset_services.dataset_upload(upload=SimpleUploadedFile("big.txt", lines))
    assert row.status == "queued"
    filler = fill(small_disk, leave=64 * 1024)
    row = worker_ended(row.pk)
    assert row.status == "error" and row.error_message.startswith("The disk filled up while")
    assert not dataset_storage.dataset_dir(row.pk).exists() and serves_pages(Client())
    filler.unlink()
    FIGURES["jobs ended cleanly by a disk that filled up"] += 1


def test_an_upload_that_outgrows_the_disk_in_the_worker_ends_error_and_leaves_nothing(
    settings, small_disk
):
    """Control characters grow six-fold in JSON (\\u0001): the 2x preflight passes and the
    request stores the file and answers `queued`; the disk fills while the worker normalizes."""
    settings.DATASETS_DIR = small_disk
    fill(small_disk, leave=2 * 1024 * 1024)
    body = (b"\x01" * 999 + b"\n") * 400  # 400 KB in, 2.4 MB of JSON out
    r = Client().post("/api/datasets", {"file": SimpleUploadedFile("ctl.txt", body)})
    assert r.status_code == 202 and r.json()["status"] == "queued", r.content
    row = worker_ended(r.json()["id"])
    assert row.status == "error" and row.error_message.startswith("The disk filled up while")
    assert [p.name for p in small_disk.iterdir()] == ["filler"] and serves_pages(Client())
    FIGURES["jobs ended cleanly by a disk that filled up"] += 1
