"""A cancel meets a worker that ends, fails or dies: a cancel the API answered 200 ends the job
`cancelled` with its files removed, one that comes too late is a 409 that changes nothing, and
no row waits for ever. A dead worker is its row's state as it leaves it (a stale heartbeat);
the reconciler and the tasks it queues run as in a worker."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from django.utils import timezone

from datasets_app.models import Dataset, DatasetStatus
from mistudio.errors import Conflict
from mistudio.testing._hub_lies import Lie
from mistudio.testing.tiny_models import build_tiny_model
from models_app import exports, extraction, parts, reconcile, services, tasks
from models_app.ml.storage import verify
from models_app.models import (
    ExtractionExport,
    ExtractionJob,
    ExtractionPart,
    ExtractionStatus,
    Model,
    ModelStatus,
)

from .helpers import cache_files, cancel_when_asked, download, in_thread, text_dataset, wait_for

pytestmark = pytest.mark.django_db(transaction=True)

STALE = timedelta(hours=1)


def _stale(cls, pk: str, **fields) -> None:
    cls.objects.filter(pk=pk).update(heartbeat_at=timezone.now() - STALE, **fields)


def _start(row, **overrides) -> ExtractionJob:
    params = dict(layers=[0], hook_types=["residual"], batch_size=2, max_samples=4,
                  context_size=32) | overrides  # fmt: skip
    return extraction.extraction_start(model_id=row.pk, dataset_id=text_dataset().pk, **params)


def _parts_done_then_died(row, phase: str) -> ExtractionJob:
    """What a worker leaves when it planned the job and ran every part (the task's own steps),
    then died before the merge ended the job: the job running in `phase`, heartbeat stale."""
    job = _start(row, max_samples=8)
    running = dict(status=ExtractionStatus.RUNNING, phase="loading the model")
    assert ExtractionJob.claim(job.pk, from_status=ExtractionStatus.QUEUED, **running)
    job = ExtractionJob.objects.get(pk=job.pk)
    parts._plan(job, True)
    while (part := parts.part_claim(job)) is not None:
        assert parts._part_run(job, part, True)
    _stale(ExtractionJob, job.pk, phase=phase)
    return job


# -- the API's answer -------------------------------------------------------------------------


@pytest.mark.parametrize("status", ["ready", "error", "cancelled"])
def test_a_cancel_of_a_row_that_ended_is_refused_and_sets_nothing(status):
    """The flag is set by one UPDATE that takes only an active row (a row read as active and
    ended by its worker before the flag is set answers 409, never a 200 for a finished job)."""
    model = Model.objects.create(name="m", hf_repo_id="o/m", quantization="Q4", status=status)
    dataset = Dataset.objects.create(name="d", source="upload", status=status)
    for cls, row in ((Model, model), (Dataset, dataset)):
        with pytest.raises(Conflict, match=f"is {status}; there is nothing to cancel"):
            cls.request_cancel(row.pk, active=("downloading", "importing"), what=row.name)
        assert not cls.objects.get(pk=row.pk).cancel_flag


# -- a failure after the cancel ----------------------------------------------------------------


def test_a_cancel_then_a_refused_file_ends_cancelled_with_nothing_left(hub, settings, tmp_path):
    """The cancel lands as a one-chunk file is asked for (no poll sees it during that file) and
    the file then fails its checksum: the user asked to stop first, so the job ends cancelled."""
    folder = build_tiny_model("llama", tmp_path / "mini", layers=1, hidden=16)
    hub.add_repo("tiny/llama-checksum", folder)
    row = services.model_download(hf_repo_id="tiny/llama-checksum", quantization="FP16")
    name = "model.safetensors"
    hub.lie("tiny/llama-checksum", Lie(bodies={name: (folder / name).read_bytes()[::-1]}))
    asked = cancel_when_asked(hub, name, row.pk)
    tasks.model_download_task(row.pk)
    row.refresh_from_db()
    assert asked and (row.status, row.error_message) == ("cancelled", "Cancelled by the user.")
    assert not [f for f in cache_files(settings) if "blobs" in f or "snapshots" in f]


# -- the worker dies after the cancel -----------------------------------------------------------


@pytest.mark.parametrize("status", [ModelStatus.DOWNLOADING, ModelStatus.QUANTIZING])
def test_the_reconciler_ends_a_cancelled_job_whose_worker_died_cancelled(hub, settings, status):
    row = services.model_download(hf_repo_id="tiny/gpt2", quantization="FP16")
    Model.objects.filter(pk=row.pk).update(status=status, phase="loading with quantization")
    services.model_cancel(row.pk)  # 200: the worker was to see the flag, and died
    _stale(Model, row.pk)
    assert reconcile.jobs_reconcile() == 1
    row.refresh_from_db()
    assert (row.status, row.error_message) == ("cancelled", "Cancelled by the user.")
    assert not [f for f in cache_files(settings) if "blobs" in f or "snapshots" in f]


def test_the_reconciler_ends_a_cancelled_import_whose_worker_died_cancelled():
    dataset = text_dataset()
    Dataset.objects.filter(pk=dataset.pk).update(status=DatasetStatus.IMPORTING)
    Dataset.request_cancel(dataset.pk, active=("importing",), what="d")
    _stale(Dataset, dataset.pk)
    reconcile.reconcile_all()
    dataset.refresh_from_db()
    assert (dataset.status, dataset.error_message) == ("cancelled", "Cancelled by the user.")


def test_a_cancel_while_planning_then_the_worker_dies_ends_cancelled(hub):
    """No part exists yet, so the API leaves the end to the worker; the worker dies. The
    reconciler used to queue the job again, and the task never claims a cancelled row."""
    job = _start(download("tiny/gpt2"))
    ExtractionJob.objects.filter(pk=job.pk).update(status=ExtractionStatus.RUNNING, attempt=1,
                                                   phase="packing the token stream")  # fmt: skip
    extraction.extraction_cancel(job.pk)
    assert ExtractionJob.objects.get(pk=job.pk).status == ExtractionStatus.RUNNING
    _stale(ExtractionJob, job.pk)
    reconcile.jobs_reconcile()
    tasks.extraction_run_task(job.pk)  # whatever the reconciler queued, delivered
    job.refresh_from_db()
    assert (job.status, job.error_message) == ("cancelled", "Cancelled by the user.")
    assert not Path(job.output_path).exists()


def test_a_worker_that_died_between_its_last_part_and_the_merge_is_resumed(hub):
    """Nothing merged such a job: the reconciler resumed only merges and running parts."""
    job = _parts_done_then_died(download("tiny/gpt2"), "extracting")
    assert reconcile.jobs_reconcile() == 1
    tasks.extraction_part_task(job.pk)  # the task it queued
    job.refresh_from_db()
    assert job.status == ExtractionStatus.COMPLETED and verify(Path(job.output_path)) == []


def test_a_cancel_during_the_merge_is_left_to_the_merge_and_delete_waits(hub):
    """The merge holds no part, so the API used to end the row at once and remove the folder
    while the merge still wrote into it; delete was then allowed under the running merge."""
    job = _parts_done_then_died(download("tiny/gpt2"), parts.MERGING)
    extraction.extraction_cancel(job.pk)
    assert ExtractionJob.objects.get(pk=job.pk).status == ExtractionStatus.RUNNING
    with pytest.raises(Conflict):
        extraction.extraction_delete(job.pk)
    reconcile.jobs_reconcile()  # its merge worker died too: the merge is resumed, and stops
    tasks.extraction_part_task(job.pk)
    job.refresh_from_db()
    assert (job.status, job.error_message) == ("cancelled", "Cancelled by the user.")
    assert not Path(job.output_path).exists()


def test_a_failed_part_whose_worker_died_before_ending_the_job_fails_it(hub):
    job = _parts_done_then_died(download("tiny/gpt2"), "extracting")
    ExtractionPart.objects.filter(extraction=job, index=0).update(
        status="failed", last_error="disk on fire"
    )
    reconcile.jobs_reconcile()
    tasks.extraction_part_task(job.pk)
    job.refresh_from_db()
    assert (job.status, job.error_message) == ("failed", "disk on fire")
    assert not Path(job.output_path).exists()


def test_an_export_taken_for_dead_while_it_still_runs_never_ends_completed(hub):
    """The reconciler ends a running export whose heartbeat looks stale (failed, folder removed)
    while its worker still writes: the worker must not write `completed` over it, and what it
    wrote after goes too. (If the export ended before the reconciler looked, it is whole.)"""
    job = _start(download("tiny/gpt2"), layers=[0, 1], hook_types=["residual", "mlp"],
                 max_samples=64, context_size=64)  # fmt: skip
    tasks.extraction_run_task(job.pk)
    job.refresh_from_db()
    exports.extraction_export_start(job.pk)
    worker = in_thread(tasks.extraction_export_task, job.pk)
    export = ExtractionExport.objects.filter(pk=job.pk)
    wait_for(lambda: export.filter(progress__gt=0).exists() or not worker.is_alive(), every=0)
    _stale(ExtractionExport, job.pk)
    reconcile.jobs_reconcile()
    worker.join(timeout=300)
    row, folder = export.get(), Path(job.output_path) / "saelens"
    if row.status == ExtractionStatus.COMPLETED:
        assert folder.is_dir() and row.finished_at is not None
    else:
        assert row.status == ExtractionStatus.FAILED and not folder.exists(), row.status
