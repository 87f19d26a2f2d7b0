"""The same task delivered twice at once for one job (a broker redelivery racing the first):
one claim wins, the other does nothing — one output, one set of state transitions."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from django.conf import settings
from django.db import connections

from datasets_app import services as dataset_services
from datasets_app import storage as dataset_storage
from datasets_app import tasks as dataset_tasks
from datasets_app.models import Dataset
from models_app import extraction, services, tasks
from models_app.models import ExtractionJob, Model
from models_app.tests.helpers import download, text_dataset

from .conftest import FIGURES

pytestmark = pytest.mark.django_db(transaction=True)


class Transitions(threading.Thread):
    """Records the statuses a row goes through (each change once) until stopped."""

    def __init__(self, model_cls, pk: str):
        super().__init__(daemon=True)
        self.rows = model_cls.objects.filter(pk=pk)
        self.seen: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                status = self.rows.values_list("status", flat=True).first()
                if status and (not self.seen or self.seen[-1] != status):
                    self.seen.append(status)
                self.stop.wait(0.001)
        finally:
            connections.close_all()

    def __enter__(self) -> Transitions:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.join()


def twice_at_once(task, pk: str) -> None:
    """Run `task(pk)` in two threads released together, as two workers would."""
    gate = threading.Barrier(2)

    def deliver() -> None:
        gate.wait()
        try:
            task(pk)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=deliver) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    FIGURES["duplicate deliveries raced"] += 1


def in_order_once(seen: list[str], expected: list[str]) -> bool:
    """Each status at most once, in the expected order (a fast step may be missed)."""
    return len(seen) == len(set(seen)) and seen == [s for s in expected if s in seen]


def test_a_download_delivered_twice_at_once_downloads_and_loads_once(hub):
    row = services.model_download(hf_repo_id="tiny/llama", quantization="Q4")
    with Transitions(Model, row.pk) as seen:
        twice_at_once(tasks.model_download_task, row.pk)
        twice_at_once(tasks.model_load_check_task, row.pk)
    row.refresh_from_db()
    assert (row.status, row.attempt) == ("ready", 2), row.error_message  # one claim per step
    assert in_order_once(seen.seen, ["queued", "downloading", "quantizing", "ready"]), seen.seen
    blobs = list(Path(settings.MODELS_CACHE_DIR).rglob("blobs/*"))
    assert len(blobs) == len(row.files) and not [b for b in blobs if b.suffix == ".incomplete"]


def test_an_extraction_delivered_twice_at_once_writes_one_output(hub):
    model = download("tiny/llama")
    dataset = text_dataset()
    job = extraction.extraction_start(
        model_id=model.pk,
        dataset_id=dataset.pk,
        layers=[0, 1],
        hook_types=["residual"],
        batch_size=4,
        max_samples=12,
        context_size=32,
    )
    with Transitions(ExtractionJob, job.pk) as seen:
        twice_at_once(tasks.extraction_run_task, job.pk)
    job.refresh_from_db()
    assert (job.status, job.attempt) == ("completed", 1), job.error_message
    assert in_order_once(seen.seen, ["queued", "running", "completed"]), seen.seen
    outputs = list(Path(settings.ACTIVATIONS_DIR).iterdir())
    assert outputs == [Path(job.output_path)] and len(list(outputs[0].rglob("manifest.json"))) == 1
    assert len(list(outputs[0].rglob("*.safetensors"))) == 2  # one shard per hook, written once


def test_a_dataset_import_delivered_twice_at_once_imports_once(hub, texts_repo):
    row = dataset_services.dataset_import(hf_dataset_id=texts_repo)
    with Transitions(Dataset, row.pk) as seen:
        twice_at_once(dataset_tasks.dataset_import_task, row.pk)
    row.refresh_from_db()
    assert (row.status, row.attempt, row.row_count) == ("ready", 1, 40), row.error_message
    assert in_order_once(seen.seen, ["queued", "importing", "ready"]), seen.seen
    files = [p.name for p in dataset_storage.dataset_dir(row.pk).iterdir()]
    assert files == ["texts.jsonl"]
