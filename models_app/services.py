"""Model services: the one place for the rules of downloading, cancelling, deleting and loading.

Views, the JSON API, tasks and the CLI call these; they never touch the rows directly.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Count, F, Prefetch
from django.utils import timezone
from django_q.tasks import async_task

from mistudio.errors import Conflict, Invalid, NotFound
from mistudio.secretbox import seal, unseal

from . import hub
from .models import (
    ACTIVE_STATUSES,
    EXTRACTION_ACTIVE,
    FAILED_STATUSES,
    ExtractionJob,
    HubCredential,
    Model,
    ModelStatus,
)
from .progress import ByteProgress, heartbeat, notify, row_update

log = logging.getLogger(__name__)


def model_get(model_id: str) -> Model:
    try:
        return Model.objects.get(pk=model_id)
    except (Model.DoesNotExist, ValueError):
        raise NotFound(f"No model with id {model_id}.") from None


def model_list(*, status: str | None = None):
    """Models newest first, with `extraction_count` and `active_extractions` for the cards."""
    active = ExtractionJob.objects.filter(status__in=EXTRACTION_ACTIVE).order_by("-created_at")
    # An aggregate drops Meta.ordering (GROUP BY query): order explicitly, newest first.
    qs = (
        Model.objects.annotate(extraction_count=Count("extractions"))
        .prefetch_related(Prefetch("extractions", queryset=active, to_attr="active_extractions"))
        .order_by("-created_at")
    )
    if status:
        if status not in ModelStatus.values:
            raise Invalid(f"status must be one of {', '.join(ModelStatus.values)}.")
        qs = qs.filter(status=status)
    return qs


def model_card_get(model_id: str) -> Model:
    """One model with what its card shows (see model_list)."""
    try:
        return model_list().get(pk=model_id)
    except (Model.DoesNotExist, ValueError):
        raise NotFound(f"No model with id {model_id}.") from None


def _duplicate_check(repo_id: str, quantization: str) -> None:
    live = Model.objects.filter(hf_repo_id=repo_id, quantization=quantization).exclude(
        status__in=FAILED_STATUSES
    )
    if live.exists():
        raise Conflict(
            f"{repo_id} at {quantization} is already in your models; delete it first to"
            " download it again.",
            code="duplicate",
        )


def _preflight(repo_id: str, revision: str, token: str | None) -> hub.Preflight:
    pre = hub.repo_preflight(
        repo_id,
        revision=revision,
        token=token,
        endpoint=settings.HF_ENDPOINT,
        allow_pickle=settings.ALLOW_PICKLE_WEIGHTS,
    )
    hub.disk_check(settings.MODELS_CACHE_DIR, pre.total_bytes, settings.DISK_MARGIN_BYTES)
    return pre


def _estimates(config: dict, quantization: str) -> tuple[int | None, int | None]:
    from .ml.estimate import estimate_memory, estimate_parameters

    try:
        return estimate_parameters(config), estimate_memory(config)[quantization]
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None, None  # an unusual config: the load check will give the real numbers


def model_download(
    *,
    hf_repo_id: str,
    quantization: str,
    access_token: str | None = None,
    revision: str | None = None,
) -> Model:
    """Check the repo (access, files, disk), create the row and queue the download job.

    Inputs are already validated by `schemas.DownloadIn`. Raises Conflict (409) for a live duplicate
    and hub.HubError (4xx with a message) when the Hub refuses or the disk is too small.
    """
    revision = revision or "main"
    _duplicate_check(hf_repo_id, quantization)
    pre = _preflight(hf_repo_id, revision, access_token)
    params, mem = _estimates(_config_for(hf_repo_id, pre.commit_sha, access_token), quantization)
    try:
        with transaction.atomic():
            row = Model.objects.create(
                name=hf_repo_id.split("/")[-1],
                hf_repo_id=hf_repo_id,
                revision=revision,
                commit_sha=pre.commit_sha,
                quantization=quantization,
                bytes_total=pre.total_bytes,
                phase="waiting for a download worker",
                files=[{"name": f.name, "size": f.size} for f in pre.files],
                params=params,
                mem_estimate_bytes=mem,
            )
            if access_token:
                HubCredential.objects.create(model=row, ciphertext=seal(access_token))
            transaction.on_commit(lambda: enqueue_download(row.pk))
    except IntegrityError:
        raise Conflict(
            f"{hf_repo_id} at {quantization} is already in your models.", code="duplicate"
        ) from None
    notify("card.changed", row.pk)
    return row


def enqueue_download(model_id: str) -> None:
    async_task(
        "models_app.tasks.model_download_task",
        model_id,
        cluster=settings.DOWNLOAD_CLUSTER,
        task_name=f"download {model_id}",
    )


def enqueue_gpu(func: str, model_id: str) -> None:
    async_task(
        f"models_app.tasks.{func}",
        model_id,
        cluster=settings.GPU_CLUSTER,
        task_name=f"{func} {model_id}",
    )


def _token_for(row: Model) -> str | None:
    cred = HubCredential.objects.filter(model_id=row.pk).first()
    return unseal(cred.ciphertext) if cred else None


def _credential_drop(model_id: str) -> None:
    HubCredential.objects.filter(model_id=model_id).delete()


WAITING_GPU = "waiting for the GPU worker"


def job_claim(
    model_id: str, *, where_status: str, where_phase: str | None = None, **fields
) -> bool:
    """Take a queued step of a job exactly once: a second delivery finds nothing to claim.

    Matches the row in `where_status` (and `where_phase`), sets `fields` and bumps `attempt`.
    """
    now = timezone.now()
    where = {"pk": model_id, "status": where_status, "cancel_requested": False}
    if where_phase is not None:
        where["phase"] = where_phase
    n = Model.objects.filter(**where).update(
        attempt=F("attempt") + 1, heartbeat_at=now, updated_at=now, **fields
    )
    if n:
        notify("card.changed", model_id)
    return n == 1


def _cancel_requested(model_id: str) -> bool:
    return Model.objects.filter(pk=model_id, cancel_requested=True).exists()


def job_finish(model_id: str, status: str, **fields) -> None:
    row_update(Model, model_id, status=status, speed_bps=0, eta_seconds=None, **fields)


def job_fail(model_id: str, message: str) -> None:
    log.warning("model %s failed: %s", model_id, message)
    _credential_drop(model_id)
    job_finish(model_id, ModelStatus.ERROR, error_message=message, phase="")


def job_cancelled(row: Model) -> None:
    hub.partial_files_remove(settings.MODELS_CACHE_DIR, row.hf_repo_id)
    _files_remove_if_unused(row)
    _credential_drop(row.pk)
    job_finish(row.pk, ModelStatus.CANCELLED, phase="", error_message="Cancelled by the user.")


def model_download_run(model_id: str) -> None:
    """The download job: preflight again, fetch the files with byte progress, hand over to the GPU
    worker for the load check. Ends `quantizing` (queued for the load check), `error`, `cancelled`.
    """
    if not job_claim(
        model_id,
        where_status=ModelStatus.QUEUED,
        status=ModelStatus.DOWNLOADING,
        phase="checking the repo",
        progress=0,
        bytes_done=0,
    ):
        return
    row = Model.objects.get(pk=model_id)
    token = _token_for(row)
    try:
        with heartbeat(Model, model_id):  # a slow Hub is not a dead worker
            pre, snapshot = _files_fetch(row, token)
    except hub.DownloadCancelled:
        job_cancelled(row)
        return
    except hub.HubError as exc:
        hub.partial_files_remove(settings.MODELS_CACHE_DIR, row.hf_repo_id)
        job_fail(model_id, exc.message)
        return
    finally:
        token = None
    _credential_drop(model_id)
    row_update(
        Model,
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


def _files_fetch(row: Model, token: str | None) -> tuple[hub.Preflight, Path]:
    """Preflight again (pinned commit), then fetch the files with byte progress on the row."""
    pre = _preflight(row.hf_repo_id, row.commit_sha or row.revision, token)
    row_update(
        Model,
        row.pk,
        bytes_total=pre.total_bytes,
        phase="downloading",
        files=[{"name": f.name, "size": f.size} for f in pre.files],
    )
    tracker = ByteProgress(lambda **kw: row_update(Model, row.pk, **kw), pre.total_bytes)
    snapshot = hub.files_download(
        pre,
        token=token,
        endpoint=settings.HF_ENDPOINT,
        cache_dir=settings.MODELS_CACHE_DIR,
        on_bytes=tracker,
        should_cancel=lambda: _cancel_requested(row.pk),
    )
    tracker.flush()
    return pre, snapshot


def model_cancel(model_id: str) -> Model:
    """Cancel a queued or running download. Queued rows end at once; running jobs stop at the next
    chunk and clean up. Raises Conflict when there is nothing to cancel."""
    row = model_get(model_id)
    if row.status not in ACTIVE_STATUSES:
        raise Conflict(f"{row.hf_repo_id} is {row.status}; there is nothing to cancel.")
    Model.objects.filter(pk=model_id).update(cancel_requested=True, updated_at=timezone.now())
    # A step that has not started yet will never see the flag: end it here.
    waiting = Model.objects.filter(pk=model_id, status=ModelStatus.QUEUED) | Model.objects.filter(
        pk=model_id, status=ModelStatus.QUANTIZING, phase=WAITING_GPU
    )
    if waiting.update(
        status=ModelStatus.CANCELLED,
        error_message="Cancelled by the user.",
        phase="",
        updated_at=timezone.now(),
    ):
        _credential_drop(model_id)
        _files_remove_if_unused(row)
    notify("card.changed", model_id)
    return model_get(model_id)


def _files_remove_if_unused(row: Model) -> None:
    """Delete the repo from the HF cache unless another model row still uses it."""
    others = Model.objects.filter(hf_repo_id=row.hf_repo_id).exclude(pk=row.pk)
    if others.exclude(status__in=FAILED_STATUSES).exists():
        return
    folder = hub.repo_cache_dir(Path(settings.MODELS_CACHE_DIR), row.hf_repo_id)
    shutil.rmtree(folder, ignore_errors=True)
    locks = Path(settings.MODELS_CACHE_DIR) / ".locks" / folder.name
    shutil.rmtree(locks, ignore_errors=True)


def model_delete(model_id: str) -> None:
    """Delete a model and its files. Raises Conflict while its download or load check runs."""
    row = model_get(model_id)
    if row.status in ACTIVE_STATUSES:
        raise Conflict(f"{row.hf_repo_id} is {row.status}; cancel it before deleting it.")
    from .extraction import extractions_remove_for_model

    extractions_remove_for_model(row)
    if row.is_loaded:
        enqueue_gpu("model_unload_task", model_id)
    _files_remove_if_unused(row)
    row.delete()
    notify("card.deleted", model_id)


def _config_for(repo_id: str, revision: str, token: str | None) -> dict:
    return hub.config_fetch(
        repo_id,
        revision=revision,
        token=token,
        endpoint=settings.HF_ENDPOINT,
        cache_dir=settings.MODELS_CACHE_DIR,
    )


def model_estimate(
    *, hf_repo_id: str, access_token: str | None = None, revision: str | None = None
) -> dict:
    """Parameter count and memory per quantization from config.json alone, with a fit label
    against the device's free memory: {params, rows: [{quantization, bytes, fit, label}], device}.
    """
    from .ml.estimate import estimate_memory, estimate_parameters, fit_label
    from .resident import device_summary

    config = _config_for(hf_repo_id, revision or "main", access_token)
    dev = device_summary()
    rows = []
    for quantization, needed in estimate_memory(config, dev["kind"]).items():
        code, label = fit_label(needed, dev)
        rows.append({"quantization": quantization, "bytes": needed, "fit": code, "label": label})
    return {
        "repo_id": hf_repo_id,
        "params": estimate_parameters(config),
        "rows": rows,
        "device": dev,
        "architecture": (config.get("architectures") or [""])[0],
    }


def model_architecture(model_id: str) -> dict:
    """The architecture recorded by the load check (real config and modules)."""
    row = model_get(model_id)
    arch = (row.metadata or {}).get("architecture")
    if row.status != ModelStatus.READY or not arch:
        raise Conflict(f"{row.hf_repo_id} is {row.status}; its architecture is known once ready.")
    return arch
