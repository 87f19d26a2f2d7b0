"""Dataset import jobs, run by the download cluster's workers (tasks pass the dataset id only).

A job claims its row exactly once, reports progress on the row (download bytes fill the first
DOWNLOAD_SHARE percent of the bar, normalizing the rest), checks for cancellation between chunks
and batches, and always ends `ready`, `error` (readable message) or `cancelled`, with no partial
files left behind.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable

from django.conf import settings

from mistudio.errors import is_disk_full
from mistudio.hub import HubError
from mistudio.jobs import ByteRate, enqueue

from . import formats, hubdata
from .formats import TEXTS_FILE, FormatError, ImportCancelled, Normalized, Source
from .models import Dataset, DatasetCredential, DatasetStatus
from .storage import dataset_dir, files_remove

log = logging.getLogger(__name__)

DOWNLOAD_SHARE = 60.0
DISK_FULL = (
    "The disk filled up while writing the dataset to {path}. Partial files were removed; free"
    " some space, then delete this entry and import it again."
)
UNEXPECTED = (
    "The import stopped on an unexpected error ({name}); the worker log has the"
    " details. Delete this entry and try again."
)


def enqueue_job(task: str, dataset_id: str) -> None:
    """Queue `datasets_app.tasks.<task>(dataset_id)` on the download cluster."""
    enqueue(f"datasets_app.tasks.{task}", dataset_id, cluster=settings.DOWNLOAD_CLUSTER)


def _claim(dataset_id: str, **fields) -> bool:
    """Move a queued row to `importing` exactly once; a second delivery finds nothing to claim."""
    return Dataset.claim(
        dataset_id, from_status=DatasetStatus.QUEUED, status=DatasetStatus.IMPORTING, **fields
    )


def _job_end(dataset_id: str, status: str, **fields) -> None:
    Dataset.touch(dataset_id, status=status, speed_bps=0, eta_seconds=None, phase="", **fields)


def job_fail(dataset_id: str, message: str) -> None:
    """End a job in `error` with `message`; its files and token are removed. `cancelled`
    instead when the user had asked to stop (a cancel answered 200 ends cancelled)."""
    if Dataset.cancel_requested(dataset_id):
        job_cancelled(dataset_id)
        return
    log.warning("dataset %s failed: %s", dataset_id, message)
    files_remove(dataset_id)
    DatasetCredential.drop(dataset_id)
    _job_end(dataset_id, DatasetStatus.ERROR, error_message=message)


def job_cancelled(dataset_id: str) -> None:
    files_remove(dataset_id)
    DatasetCredential.drop(dataset_id)
    _job_end(dataset_id, DatasetStatus.CANCELLED, error_message="Cancelled by the user.")


def _job_ready(dataset_id: str, result: Normalized) -> None:
    """Ready, unless a cancel landed after the last poll (then cancelled) or the row ended
    meanwhile; either way the files go."""
    DatasetCredential.drop(dataset_id)
    if Dataset.advance(
        dataset_id,
        from_status=DatasetStatus.IMPORTING,
        status=DatasetStatus.READY,
        speed_bps=0,
        eta_seconds=None,
        phase="",
        progress=100.0,
        row_count=result.row_count,
        size_bytes=result.size_bytes,
        preview=result.preview,
    ):
        return
    if Dataset.stopped_in(dataset_id, DatasetStatus.IMPORTING):
        job_cancelled(dataset_id)
    else:  # ended meanwhile (the reconciler took it for dead) or deleted: what it wrote goes
        files_remove(dataset_id)


def _normalize(dataset_id: str, sources: list[Source], start: float) -> Normalized:
    """Normalize `sources` into texts.jsonl; progress runs from `start` to just under 100."""
    if Dataset.cancel_requested(dataset_id):  # between the download and the first batch
        raise ImportCancelled()

    def tick(fraction: float, rows: int) -> None:
        if Dataset.cancel_requested(dataset_id):
            raise ImportCancelled()
        Dataset.touch(
            dataset_id,
            progress=min(start + (100.0 - start) * fraction, 99.9),
            row_count=rows,
            phase=f"normalizing · {rows:,} rows",
        )

    Dataset.touch(dataset_id, progress=start, phase="normalizing", speed_bps=0, eta_seconds=None)
    return formats.texts_normalize(
        sources, dataset_dir(dataset_id) / TEXTS_FILE, on_tick=tick,
        row_max=settings.DATASET_ROW_MAX_BYTES, inflated_max=settings.DATASET_INFLATED_MAX_BYTES,
    )  # fmt: skip


def _run(dataset_id: str, work: Callable[[], Normalized]) -> None:
    """Run `work` under a heartbeat and end the row in exactly one terminal state."""
    try:
        with Dataset.heartbeat(dataset_id):
            result = work()
    except ImportCancelled:
        job_cancelled(dataset_id)
    except (HubError, FormatError) as exc:
        job_fail(dataset_id, exc.message)
    except Exception as exc:  # noqa: BLE001 - a bug must still end the job with a message
        if is_disk_full(exc):
            job_fail(dataset_id, DISK_FULL.format(path=settings.DATASETS_DIR))
            return
        log.exception("dataset %s import crashed", dataset_id)
        job_fail(dataset_id, UNEXPECTED.format(name=type(exc).__name__))
    else:
        _job_ready(dataset_id, result)


def _download_progress(dataset_id: str, *, progress: float, **fields) -> None:
    Dataset.touch(dataset_id, progress=progress * DOWNLOAD_SHARE / 100.0, **fields)


def _hub_files(row: Dataset, token: str | None) -> Normalized:
    pre = hubdata.dataset_preflight(
        row.hf_dataset_id,
        split=row.split,
        revision=row.commit_sha or row.revision,
        token=token,
        endpoint=settings.HF_ENDPOINT,
    )
    Dataset.touch(
        row.pk,
        bytes_total=pre.total_bytes,
        phase="downloading",
        file_format=pre.fmt,
        files=pre.files_json(),
    )
    tracker = ByteRate(lambda **kw: _download_progress(row.pk, **kw), pre.total_bytes)
    raw = dataset_dir(row.pk) / "raw"
    paths = hubdata.files_download(
        pre,
        token=token,
        endpoint=settings.HF_ENDPOINT,
        local_dir=raw,
        stall_s=settings.HUB_STALL_SECONDS,
        on_bytes=tracker,
        should_cancel=lambda: Dataset.cancel_requested(row.pk),
    )
    tracker.flush()
    sources = [
        Source(p, pre.fmt, row.text_field or None, label=f.name)
        for p, f in zip(paths, pre.files, strict=True)
    ]
    result = _normalize(row.pk, sources, DOWNLOAD_SHARE)
    shutil.rmtree(raw, ignore_errors=True)
    return result


def dataset_import_run(dataset_id: str) -> None:
    """The Hub import job: preflight again (pinned commit), download the split's files with
    byte progress, normalize them with row progress. Ends ready, error or cancelled."""
    if not _claim(dataset_id, phase="checking the repo", progress=0, bytes_done=0):
        return
    row = Dataset.objects.get(pk=dataset_id)
    token = DatasetCredential.token_for(dataset_id)
    try:
        _run(dataset_id, lambda: _hub_files(row, token))
    finally:
        token = None


def dataset_normalize_run(dataset_id: str) -> None:
    """The upload job (every upload; the CLI runs it in its own process): normalize the stored
    upload in bounded batches with progress under the row and inflated-size caps, then drop the
    upload. Ends ready, error (the cap or bad line named, no files) or cancelled."""
    if not _claim(dataset_id, phase="normalizing", progress=0):
        return
    row = Dataset.objects.get(pk=dataset_id)
    upload = dataset_dir(dataset_id) / f"upload.{row.file_format}"

    def work() -> Normalized:
        result = _normalize(
            dataset_id, [Source(upload, row.file_format, row.text_field or None)], 0.0
        )
        upload.unlink(missing_ok=True)
        return result

    _run(dataset_id, work)
