"""Model job steps: queueing, the download job, and how a job ends (ready, error, cancelled).

Every step runs in a worker and receives a model id only; the GPU steps (load check, load,
unload) are in `resident.py`. The rules users call (download, cancel, delete) are `services.py`.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from django.conf import settings
from django.db import transaction

from mistudio.hub import DownloadCancelled, HubError, Listing, disk_check
from mistudio.jobs import ByteRate, enqueue

from . import repo
from .models import FAILED_STATUSES, HubCredential, Model, ModelStatus

log = logging.getLogger(__name__)

WAITING_GPU = "waiting for the GPU worker"


def enqueue_download(model_id: str) -> None:
    enqueue("models_app.tasks.model_download_task", model_id, cluster=settings.DOWNLOAD_CLUSTER)


def enqueue_gpu(func: str, job_id: str) -> None:
    """Queue `models_app.tasks.<func>(job_id)` on the one-worker GPU cluster."""
    enqueue(f"models_app.tasks.{func}", job_id, cluster=settings.GPU_CLUSTER)


def preflight(repo_id: str, revision: str, token: str | None) -> Listing:
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
    log.warning("model %s failed: %s", model_id, message)
    HubCredential.drop(model_id)
    job_finish(model_id, ModelStatus.ERROR, error_message=message, phase="")


def job_cancelled(row: Model) -> None:
    repo.partial_files_remove(settings.MODELS_CACHE_DIR, row.hf_repo_id)
    model_files_remove(row)
    HubCredential.drop(row.pk)
    job_finish(row.pk, ModelStatus.CANCELLED, phase="", error_message="Cancelled by the user.")


def model_files_remove(row: Model) -> None:
    """Delete the repo from the HF cache unless another model row still uses it."""
    others = Model.objects.filter(hf_repo_id=row.hf_repo_id).exclude(pk=row.pk)
    if others.exclude(status__in=FAILED_STATUSES).exists():
        return
    folder = repo.repo_cache_dir(Path(settings.MODELS_CACHE_DIR), row.hf_repo_id)
    shutil.rmtree(folder, ignore_errors=True)
    locks = Path(settings.MODELS_CACHE_DIR) / ".locks" / folder.name
    shutil.rmtree(locks, ignore_errors=True)


def model_download_run(model_id: str) -> None:
    """The download job: preflight again, fetch the files with byte progress, hand over to the GPU
    worker for the load check. Ends `quantizing` (queued for the load check), `error`, `cancelled`.
    """
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
        repo.partial_files_remove(settings.MODELS_CACHE_DIR, row.hf_repo_id)
        job_fail(model_id, exc.message)
        return
    finally:
        token = None
    HubCredential.drop(model_id)
    Model.touch(
        model_id,
        status=ModelStatus.QUANTIZING,
        local_path=str(snapshot),
        size_bytes=pre.total_bytes,
        commit_sha=pre.commit_sha,
        progress=0,
        speed_bps=0,
        eta_seconds=None,
        phase=WAITING_GPU,
    )
    transaction.on_commit(lambda: enqueue_gpu("model_load_check_task", model_id))


def _files_fetch(row: Model, token: str | None) -> tuple[Listing, Path]:
    """Preflight again (pinned commit), then fetch the files with byte progress on the row."""
    pre = preflight(row.hf_repo_id, row.commit_sha or row.revision, token)
    Model.touch(
        row.pk,
        bytes_total=pre.total_bytes,
        phase="downloading",
        files=pre.files_json(),
    )
    tracker = ByteRate(lambda **kw: Model.touch(row.pk, **kw), pre.total_bytes)
    snapshot = repo.files_download(
        pre,
        token=token,
        endpoint=settings.HF_ENDPOINT,
        cache_dir=settings.MODELS_CACHE_DIR,
        on_bytes=tracker,
        should_cancel=lambda: Model.cancel_requested(row.pk),
    )
    tracker.flush()
    return pre, snapshot
