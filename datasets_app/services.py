"""Dataset services: the one place for the rules of registering, cancelling, deleting and reading
datasets. Views, the JSON API, tasks and the extraction job call these.

Storage: every dataset ends as `<DATASETS_DIR>/<id>/texts.jsonl`, one JSON string per line (empty
rows skipped). No request ever normalizes: an upload is streamed to disk, its first rows are
checked in bounded memory (a wrong field, format or encoding, or a row over the row cap, is a 4xx
at once and nothing is kept), and it is queued; uploads and Hub imports are normalized by worker
jobs (`jobs.py`) with progress, under the row and inflated-size caps.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from django.conf import settings
from django.core.files import File
from django.core.files.uploadedfile import UploadedFile
from django.utils import timezone

from mistudio.errors import Conflict, Invalid, NotFound, ServiceError, is_disk_full, room_check
from mistudio.humanize import bytes_h

from . import formats, hubdata
from .formats import FIELD_FORMATS, FormatError
from .jobs import dataset_normalize_run, enqueue_job
from .models import (
    ACTIVE_STATUSES,
    FAILED_STATUSES,
    Dataset,
    DatasetCredential,
    DatasetSource,
    DatasetStatus,
    new_dataset_id,
)
from .schemas import NAME_MAX
from .storage import dataset_dir, files_remove, texts_path

log = logging.getLogger(__name__)

WAITING = "waiting for a worker"
# Statuses of an extraction (the rows that point at a dataset) that still read it.
EXTRACTION_READING = ("queued", "running")
# A multipart body carries a few hundred bytes besides the file; allow for them.
MULTIPART_SLACK = 64 * 1024


def dataset_get(dataset_id: str) -> Dataset:
    try:
        return Dataset.objects.get(pk=dataset_id)
    except (Dataset.DoesNotExist, ValueError):
        raise NotFound(f"No dataset with id {dataset_id}.") from None


def _too_large(size: int) -> ServiceError:
    cap = settings.DATASET_UPLOAD_MAX_BYTES
    return ServiceError(
        f"The file is {bytes_h(size)}; uploads are limited to {bytes_h(cap)}"
        " (MISTUDIO_DATASET_UPLOAD_MAX_MB).",
        code="too_large",
        status=413,
    )


def upload_length_check(content_length: str | int | None) -> None:
    """Refuse (413) a request body larger than the upload limit before it is parsed."""
    try:
        length = int(content_length or 0)
    except (TypeError, ValueError):
        return  # no usable length: the file's own size is checked once it is parsed
    if length > settings.DATASET_UPLOAD_MAX_BYTES + MULTIPART_SLACK:
        raise _too_large(length)


def _upload_format(filename: str) -> str:
    fmt = formats.format_of(filename)
    if fmt is None:
        ext = Path(filename).suffix or "(none)"
        raise Invalid(
            f"Unsupported file type {ext}: upload a .txt, .jsonl, .csv or .parquet file.",
            code="unsupported",
        )
    return fmt


def _upload_size_check(size: int) -> None:
    if size == 0:
        raise Invalid("The file is empty.", code="empty")
    if size > settings.DATASET_UPLOAD_MAX_BYTES:
        raise _too_large(size)


def dataset_named(name: str) -> Dataset | None:
    """The dataset holding `name` (failed and cancelled rows free their name)."""
    return Dataset.objects.filter(name=name).exclude(status__in=FAILED_STATUSES).first()


def _name_free(name: str) -> None:
    if dataset_named(name):
        raise Conflict(
            f"A dataset named '{name}' already exists; choose another name or delete it first.",
            code="duplicate",
        )


def _disk_check(needed: int) -> None:
    room_check(settings.DATASETS_DIR, needed, settings.DISK_MARGIN_BYTES, what="the dataset")


def _row_create(*, task: str | None = None, token: str | None = None, **fields) -> Dataset:
    """Insert the row (and the sealed token) and queue `task` once the transaction commits."""
    return Dataset.create_queued(
        task=(lambda pk: enqueue_job(task, pk)) if task else None,
        conflict=f"A dataset named '{fields['name']}' already exists.",
        token=token,
        tokens=DatasetCredential,
        **fields,
    )


def _save_upload(upload: UploadedFile, dest: Path) -> None:
    with open(dest, "wb") as out:
        for chunk in upload.chunks():  # Django's uploads are spooled: never whole in memory
            out.write(chunk)


@contextlib.contextmanager
def _nothing_kept_on_error(folder: Path) -> Iterator[None]:
    """Remove `folder` on any error; a bad file or a full disk becomes Invalid (422)."""
    try:
        yield
    except FormatError as exc:
        shutil.rmtree(folder, ignore_errors=True)
        raise Invalid(exc.message, code="bad_file") from None
    except OSError as exc:
        shutil.rmtree(folder, ignore_errors=True)
        if not is_disk_full(exc):
            raise
        raise Invalid(
            f"The disk filled up while storing the dataset in {folder.parent}; nothing was kept."
            " Free some space and upload it again.",
            code="disk_full",
        ) from None
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def _first_rows_check(path: Path, fmt: str, text_field: str) -> None:
    """The request's only look inside the file: its first rows, in bounded memory and work
    (formats.texts_check); the worker reads the rest."""
    formats.texts_check(path, fmt, text_field or None, row_max=settings.DATASET_ROW_MAX_BYTES)


def dataset_upload(
    *,
    upload: UploadedFile,
    text_field: str = "text",
    name: str | None = None,
    enqueue: bool = True,
) -> Dataset:
    """Register an uploaded .txt/.jsonl/.csv/.parquet file (inputs validated by UploadIn).

    The file is stored, its first rows checked (formats.texts_check: bounded memory and work,
    whatever the file inflates to), and the `queued` row returned; a worker normalizes it
    (`dataset_normalize_task`), or the caller does with jobs.dataset_normalize_run when
    `enqueue` is False (the CLI). Raises Invalid (422: type, empty, bad first rows, a row over
    MISTUDIO_DATASET_ROW_MAX_MB, disk full), 413 (too large) or Conflict (name); on any error
    nothing stays on disk and no row exists.
    """
    filename = Path(upload.name or "upload").name
    fmt = _upload_format(filename)
    _upload_size_check(upload.size or 0)
    name = name or Path(filename).stem[:NAME_MAX] or "dataset"
    _name_free(name)
    _disk_check(2 * upload.size)
    dataset_id = new_dataset_id()
    folder = dataset_dir(dataset_id)
    folder.mkdir(parents=True)
    fields = {
        "id": dataset_id,
        "name": name,
        "source": DatasetSource.UPLOAD,
        "original_filename": filename[:255],
        "file_format": fmt,
        "text_field": text_field if fmt in FIELD_FORMATS else "",
        "bytes_total": upload.size,
    }
    with _nothing_kept_on_error(folder):
        _save_upload(upload, folder / f"upload.{fmt}")
        _first_rows_check(folder / f"upload.{fmt}", fmt, fields["text_field"])
        task = "dataset_normalize_task" if enqueue else None
        return _row_create(task=task, status=DatasetStatus.QUEUED, phase=WAITING, **fields)


def dataset_import(
    *,
    hf_dataset_id: str,
    split: str = "train",
    text_field: str = "text",
    revision: str | None = None,
    access_token: str | None = None,
    name: str | None = None,
) -> Dataset:
    """Check the Hub repo (access, the split's files, disk) and queue the import job.

    Inputs are validated by HubImportIn. Returns the `queued` row. Raises Conflict (name taken),
    HubError (403 gated, 401 bad token, 404 missing, 422 no such split / no data files) or
    Invalid (disk full); nothing is created then.
    """
    revision = revision or "main"
    name = name or f"{hf_dataset_id} ({split})"
    _name_free(name)
    pre = hubdata.dataset_preflight(
        hf_dataset_id,
        split=split,
        revision=revision,
        token=access_token,
        endpoint=settings.HF_ENDPOINT,
    )
    _disk_check(2 * pre.total_bytes)
    return _row_create(
        task="dataset_import_task",
        token=access_token,
        name=name,
        source=DatasetSource.HUB,
        hf_dataset_id=hf_dataset_id,
        split=split,
        revision=revision,
        commit_sha=pre.commit_sha,
        text_field=text_field,
        file_format=pre.fmt,
        bytes_total=pre.total_bytes,
        phase=WAITING,
        files=pre.files_json(),
    )


def dataset_cancel(dataset_id: str) -> Dataset:
    """Cancel a queued or running import. Queued rows end at once; a running job stops at the
    next chunk or batch and removes its files. Returns the row; Conflict if nothing to cancel."""
    row = dataset_get(dataset_id)
    now = timezone.now()
    Dataset.request_cancel(dataset_id, active=ACTIVE_STATUSES, what=row.name)
    # A job that has not started will never see the flag: end it here.
    if Dataset.objects.filter(pk=dataset_id, status=DatasetStatus.QUEUED).update(
        status=DatasetStatus.CANCELLED,
        error_message="Cancelled by the user.",
        phase="",
        updated_at=now,
    ):
        DatasetCredential.drop(dataset_id)
        files_remove(dataset_id)
    Dataset.announce(dataset_id)
    return dataset_get(dataset_id)


def dataset_delete(dataset_id: str) -> None:
    """Delete a dataset and its files. Raises Conflict (409) while its import is queued or
    running or an extraction reads it, NotFound for an unknown id."""
    row = dataset_get(dataset_id)
    if row.status in ACTIVE_STATUSES:
        raise Conflict(f"{row.name} is {row.status}; cancel the import before deleting it.")
    if row.extractions.filter(status__in=EXTRACTION_READING).exists():
        raise Conflict(f"An extraction is reading {row.name}; wait for it or cancel it first.")
    row.delete()
    files_remove(dataset_id)
    Dataset.announce(dataset_id, "card.deleted")


def dataset_texts(dataset_id: str) -> Iterator[str | Iterator[str]]:
    """The dataset's texts in order, streamed from its normalized file: one str per row, or for a
    row too long to hold (formats.LINE_PIECE_BYTES) an iterator of its text in pieces.

    Checks eagerly: NotFound for an unknown id, Conflict when the dataset is not ready or its
    file is missing; the returned iterator then reads lazily.
    """
    row = dataset_get(dataset_id)
    if not row.is_ready:
        raise Conflict(f"{row.name} is {row.status}; only ready datasets can be read.")
    path = texts_path(dataset_id)
    if not path.is_file():
        raise Conflict(
            f"The file of {row.name} is missing from {path.parent}; delete the"
            " dataset and register it again.",
            code="missing_files",
        )
    return formats.texts_stream(path)


def _free_name(stem: str) -> str:
    name, n = stem, 1
    while dataset_named(name):
        n += 1
        name = f"{stem} ({n})"
    return name


def dataset_resolve(
    ref: str,
    *,
    text_field: str | None = None,
    normalize: Callable[[str], None] = dataset_normalize_run,
) -> Dataset:
    """A dataset by id, by the name the Datasets page shows, or a local file registered here as a
    new dataset (same checks as an upload) and normalized in this process by `normalize(id)`
    (the worker's job, jobs.dataset_normalize_run; the CLI wraps it in a progress bar): no task
    is queued for it. NotFound when `ref` is none of these; Invalid when the file is refused,
    in the request's checks or by the normalization (the row then ends `error`, no files)."""
    if row := Dataset.objects.filter(pk=ref).first() or dataset_named(ref):
        return row  # not ready yet: the extraction request says so
    path = Path(ref).expanduser()
    if not path.is_file():
        raise NotFound(f"{ref!r} is neither a dataset id, a dataset name nor a file.")
    with path.open("rb") as fh:
        row = dataset_upload(
            upload=File(fh, name=path.name),
            text_field=text_field or "text",
            name=_free_name(path.stem),
            enqueue=False,
        )
    normalize(row.pk)
    row = dataset_get(row.pk)
    if row.status != DatasetStatus.READY:
        raise Invalid(f"{path.name}: {row.error_message or row.status}", code="bad_file")
    return row
