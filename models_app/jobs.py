"""Model job steps: queueing, the download job, and how a job ends (ready, error, cancelled).

Every step runs in a worker and receives a model id only; the GPU steps (load check, load,
unload) are in `resident.py`. The rules users call (download, cancel, delete) are `services.py`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from django.conf import settings
from django.db import transaction

from mistudio.hub import DownloadCancelled, HubError, disk_check
from mistudio.jobs import ByteRate, enqueue

from . import repo
from .ml.filecheck import FileCheckError, snapshot_check
from .models import HubCredential, Model, ModelStatus

log = logging.getLogger(__name__)

WAITING_GPU = "waiting for the GPU worker"
# A ready model's phase while a Load or Unload is on its way (the card says it in words).
LOAD_QUEUED = "waiting for the GPU worker to load it"
UNLOAD_QUEUED = "waiting for the GPU worker to unload it"
LOADING = "loading into the GPU worker"


def enqueue_download(model_id: str) -> None:
    enqueue("models_app.tasks.model_download_task", model_id, cluster=settings.DOWNLOAD_CLUSTER)


def enqueue_gpu(func: str, job_id: str) -> None:
    """Queue `models_app.tasks.<func>(job_id)` on the one-worker GPU cluster."""
    enqueue(f"models_app.tasks.{func}", job_id, cluster=settings.GPU_CLUSTER)


def preflight(repo_id: str, revision: str, token: str | None) -> repo.Preflight:
    """The repo's files (access checked) and room for them in the HF cache, before any byte."""
    pre = repo.repo_preflight(
        repo_id,
        revision=revision,
        token=token,
        endpoint=settings.HF_ENDPOINT,
        cache_dir=settings.MODELS_CACHE_DIR,
        allow_pickle=settings.ALLOW_PICKLE_WEIGHTS,
    )
    disk_check(settings.MODELS_CACHE_DIR, pre.total_bytes, settings.DISK_MARGIN_BYTES)
    return pre


def job_finish(model_id: str, status: str, **fields) -> None:
    Model.touch(model_id, status=status, speed_bps=0, eta_seconds=None, **fields)


def job_fail(model_id: str, message: str) -> None:
    """End a job `error` with `message`, or `cancelled` when the user had asked to stop (a
    cancel answered 200 ends cancelled whatever failed after it, the reconciler included)."""
    if Model.cancel_requested(model_id):
        job_cancelled(Model.objects.get(pk=model_id))
        return
    log.warning("model %s failed: %s", model_id, message)
    HubCredential.drop(model_id)
    job_finish(model_id, ModelStatus.ERROR, error_message=message, phase="")


def job_cancelled(row: Model) -> None:
    row = Model.objects.get(pk=row.pk)  # the files it fetched are on the row, not on `row`
    partial_files_remove(row)
    model_files_remove(row)
    HubCredential.drop(row.pk)
    job_finish(row.pk, ModelStatus.CANCELLED, phase="", error_message="Cancelled by the user.")


def _owned(row: Model) -> list[dict]:
    return [f for f in row.files or [] if f.get("owned")]


def partial_files_remove(row: Model) -> None:
    """Delete what an interrupted download of OUR files left in the HF cache (unfinished blobs,
    locks); another tool's download in progress keeps its own."""
    blobs = [f.get("blob", "") for f in _owned(row)]
    repo.partial_files_remove(settings.MODELS_CACHE_DIR, row.hf_repo_id, blobs)


def model_files_remove(row: Model) -> None:
    """Delete from the shared HF cache the files this row fetched, except those another model
    row of ours at the same commit lists (that row then owns them). Files another tool put there
    (present before we fetched, or never fetched by us: README, original/…) are never touched."""
    others = list(
        Model.objects.filter(hf_repo_id=row.hf_repo_id, commit_sha=row.commit_sha).exclude(
            pk=row.pk
        )
    )
    owned = [f["name"] for f in _owned(row)]
    handed_over = {name for name in owned if _hand_over(name, others)}
    remove = [name for name in owned if name not in handed_over]
    if remove and row.commit_sha:
        repo.snapshot_files_remove(
            settings.MODELS_CACHE_DIR, row.hf_repo_id, row.commit_sha, remove
        )


def _hand_over(name: str, others: list[Model]) -> bool:
    """Make the first other row that lists file `name` its owner; False when none lists it."""
    for other in others:
        files = other.files or []
        for f in files:
            if f.get("name") == name:
                f["owned"] = True
                Model.objects.filter(pk=other.pk).update(files=files)
                return True
    return False


def model_download_run(model_id: str, *, queue_load_check: bool = True) -> None:
    """The download job: preflight again, fetch the files with byte progress, hand over to the GPU
    worker for the load check. Ends `quantizing` (waiting for the load check), `error`,
    `cancelled`. `queue_load_check=False`: the caller runs the load check itself (the CLI)."""
    if not Model.claim(
        model_id,
        from_status=ModelStatus.QUEUED,
        status=ModelStatus.DOWNLOADING,
        phase="checking the repo",
        progress=0,
        bytes_done=0,
    ):
        return
    row = Model.objects.get(pk=model_id)
    token = HubCredential.token_for(model_id)
    try:
        with Model.heartbeat(model_id):  # a slow Hub is not a dead worker
            pre, snapshot = _files_fetch(row, token)
    except DownloadCancelled:
        job_cancelled(row)
        return
    except HubError as exc:
        partial_files_remove(Model.objects.get(pk=model_id))
        job_fail(model_id, exc.message)
        return
    except FileCheckError as exc:  # fetched whole, but not a file we hand to transformers
        model_files_remove(Model.objects.get(pk=model_id))
        job_fail(model_id, f"The download was refused: {exc}")
        return
    finally:
        token = None
    HubCredential.drop(model_id)
    if not Model.advance(
        model_id,
        from_status=ModelStatus.DOWNLOADING,
        status=ModelStatus.QUANTIZING,
        local_path=str(snapshot),
        size_bytes=pre.total_bytes,
        commit_sha=pre.commit_sha,
        progress=0,
        speed_bps=0,
        eta_seconds=None,
        phase=WAITING_GPU,
    ):
        if Model.stopped_in(model_id, ModelStatus.DOWNLOADING):  # after the last file's last poll
            job_cancelled(row)
        return
    if queue_load_check:
        transaction.on_commit(lambda: enqueue_gpu("model_load_check_task", model_id))


def _files_fetch(row: Model, token: str | None) -> tuple[repo.Preflight, Path]:
    """Preflight again (pinned commit), record which files are ours to fetch (not in the cache
    yet, or fetched by our request), then fetch them with byte progress on the row."""
    pre = preflight(row.hf_repo_id, row.commit_sha or row.revision, token)
    ours_already = {f["name"] for f in _owned(row)}
    fetched = frozenset(
        f.name for f in pre.files if f.name in ours_already or f.name not in pre.cached_before
    )
    files = [{**f, "owned": f["owned"] or False} for f in pre.files_json(fetched)]
    Model.touch(row.pk, bytes_total=pre.total_bytes, phase="downloading", files=files)
    tracker = ByteRate(lambda **kw: Model.touch(row.pk, **kw), pre.total_bytes)
    snapshot = repo.files_download(
        pre,
        token=token,
        endpoint=settings.HF_ENDPOINT,
        cache_dir=settings.MODELS_CACHE_DIR,
        stall_s=settings.HUB_STALL_SECONDS,
        on_bytes=tracker,
        should_cancel=lambda: Model.cancel_requested(row.pk),
    )
    tracker.flush()
    snapshot_check(snapshot)  # headers and JSON files only: bounded, before any GPU step
    return pre, snapshot
