"""Model services: the rules of requesting a download, cancelling, deleting, estimating, loading.

Views, the JSON API and the CLI call these; the job steps they queue are in `jobs.py` (download)
and `resident.py` (GPU worker). Reads are in `selectors.py`.
"""

from __future__ import annotations

import json

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from mistudio.errors import Conflict, Invalid, NotFound

from . import repo
from .extraction import extractions_remove_for_model
from .jobs import (
    LOAD_QUEUED,
    UNLOAD_QUEUED,
    WAITING_GPU,
    enqueue_download,
    enqueue_gpu,
    model_files_remove,
    preflight,
)
from .ml.configs import ConfigError
from .ml.estimate import ParameterCounts, count_parameters, memory_for
from .models import ACTIVE_STATUSES, FAILED_STATUSES, HubCredential, Model, ModelStatus
from .selectors import device_summary, fit_rows, model_get


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


def _counts_for(
    repo_id: str, revision: str, token: str | None, listing: repo.Listing | None = None
) -> ParameterCounts:
    """The repo's config.json, read and counted the way transformers builds the model (a few KB
    fetched, no weights). Invalid (422) when miStudio cannot load such a model: custom code,
    a type transformers does not know, unreadable or impossible values."""
    config = repo.config_fetch(
        repo_id,
        revision=revision,
        token=token,
        endpoint=settings.HF_ENDPOINT,
        cache_dir=settings.MODELS_CACHE_DIR,
        listing=listing,
    )
    try:
        return count_parameters(config)
    except ConfigError as exc:
        raise Invalid(f"{repo_id}: {exc}", code="unsupported_model") from None


def model_download(
    *,
    hf_repo_id: str,
    quantization: str,
    access_token: str | None = None,
    revision: str | None = None,
    enqueue: bool = True,
) -> Model:
    """Check the repo (access, files, disk), create the row and queue the download job.

    Inputs are already validated by `schemas.DownloadIn`. Raises Conflict (409) for a live duplicate
    and HubError (4xx with a message) when the Hub refuses or the disk is too small.
    `enqueue=False` leaves the job queued for the caller to run in-process (the CLI).
    """
    revision = revision or "main"
    _duplicate_check(hf_repo_id, quantization)
    pre = preflight(hf_repo_id, revision, access_token)
    counts = _counts_for(hf_repo_id, pre.commit_sha, access_token, pre)
    # config.json and a weight index were fetched just now: ours, unless already cached
    fetched_now = {"config.json", *repo.SAFETENSORS[1:], *repo.PICKLES[1:]} - pre.cached_before
    return Model.create_queued(
        task=enqueue_download if enqueue else None,
        conflict=f"{hf_repo_id} at {quantization} is already in your models.",
        token=access_token,
        tokens=HubCredential,
        name=hf_repo_id.split("/")[-1],
        hf_repo_id=hf_repo_id,
        revision=revision,
        commit_sha=pre.commit_sha,
        quantization=quantization,
        bytes_total=pre.total_bytes,
        phase="waiting for a download worker",
        files=pre.files_json(frozenset(fetched_now)),
        params=counts.total,
        mem_estimate_bytes=memory_for(counts, device_summary()["kind"])[quantization],
        metadata={"estimate": counts.to_dict()},
    )


def model_cancel(model_id: str) -> Model:
    """Cancel a queued or running download. Queued rows end at once; running jobs stop at the next
    chunk and clean up. Raises Conflict when there is nothing to cancel."""
    row = model_get(model_id)
    Model.request_cancel(model_id, active=ACTIVE_STATUSES, what=row.hf_repo_id)
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
        HubCredential.drop(model_id)
        model_files_remove(row)
    Model.announce(model_id)
    return model_get(model_id)


def model_retry(model_id: str, *, access_token: str | None = None) -> Model:
    """Download a failed or cancelled model again, in place (same row and card): the preflight
    runs again (a gated repo needs its token again: tokens are dropped when a job ends) and the
    download is queued; files already in the cache are not fetched twice. Conflict when the row
    is not failed or cancelled, or when another live row holds the same repo and quantization;
    HubError when the Hub refuses (the row is left as it was)."""
    row = model_get(model_id)
    if row.status not in FAILED_STATUSES:
        raise Conflict(
            f"{row.hf_repo_id} is {row.status}; only a failed or cancelled download can be retried."
        )
    _duplicate_check(row.hf_repo_id, row.quantization)
    pre = preflight(row.hf_repo_id, row.revision, access_token)
    _counts_for(row.hf_repo_id, pre.commit_sha, access_token, pre)  # a gated file needs the token
    with transaction.atomic():
        updated = Model.objects.filter(pk=model_id, status__in=FAILED_STATUSES).update(
            status=ModelStatus.QUEUED, phase="waiting for a download worker", progress=0,
            bytes_done=0, bytes_total=pre.total_bytes, speed_bps=0, eta_seconds=None,
            error_message="", cancel_flag=False, commit_sha=pre.commit_sha,
            files=[{**f, "owned": _was_owned(row, f["name"])} for f in pre.files_json()],
            updated_at=timezone.now(),
        )  # fmt: skip
        if not updated:
            raise Conflict(f"{row.hf_repo_id} changed meanwhile; reload and try again.")
        HubCredential.store(row, access_token)
        transaction.on_commit(lambda: enqueue_download(model_id))
    Model.announce(model_id)
    return model_get(model_id)


def _was_owned(row: Model, name: str) -> bool:
    return any(f.get("name") == name and f.get("owned") for f in row.files or [])


def model_delete(model_id: str) -> None:
    """Delete a model and its files. Raises Conflict while its download or load check runs."""
    row = model_get(model_id)
    if row.status in ACTIVE_STATUSES:
        raise Conflict(f"{row.hf_repo_id} is {row.status}; cancel it before deleting it.")
    extractions_remove_for_model(row)
    if row.is_loaded:
        enqueue_gpu("model_unload_task", model_id)
    model_files_remove(row)
    row.delete()
    Model.announce(model_id, "card.deleted")


def model_estimate(
    *, hf_repo_id: str, access_token: str | None = None, revision: str | None = None
) -> dict:
    """Parameter count and memory per quantization from config.json alone, with a fit label
    against the device's free memory: {params, rows: [{quantization, bytes, fit, label}], device}.
    """
    counts = _counts_for(hf_repo_id, revision or "main", access_token)
    dev = device_summary()
    rows = fit_rows(memory_for(counts, dev["kind"]), dev)
    return {
        "repo_id": hf_repo_id,
        "params": counts.total,
        "counts": counts.to_dict(),
        "rows": rows,
        "device": dev,
        "architecture": counts.shape.architecture,
    }


def model_add_cached(*, hf_repo_id: str, quantization: str, commit: str | None = None) -> Model:
    """Add a model that is already complete in the local HF cache (another tool downloaded it)
    without downloading it again: the row points at that snapshot and goes straight to the load
    check. Its files stay where they are and stay theirs (deleting the row never removes them).
    NotFound when the cache holds no complete snapshot of the repo (at `commit`), Invalid when
    miStudio cannot load it, Conflict for a live duplicate."""
    _duplicate_check(hf_repo_id, quantization)
    snapshot = next(
        (s for s in repo.cached_snapshots(settings.MODELS_CACHE_DIR)
         if s.repo_id == hf_repo_id and commit in (None, "", s.commit)),
        None,
    )  # fmt: skip
    if snapshot is None:
        raise NotFound(f"The Hugging Face cache holds no complete snapshot of {hf_repo_id}.")
    try:
        counts = count_parameters(json.loads((snapshot.path / "config.json").read_text()))
    except (ConfigError, ValueError, OSError) as exc:
        raise Invalid(f"{hf_repo_id}: {exc}", code="unsupported_model") from None
    return Model.create_queued(
        task=lambda pk: enqueue_gpu("model_load_check_task", pk),
        conflict=f"{hf_repo_id} at {quantization} is already in your models.",
        name=hf_repo_id.split("/")[-1],
        hf_repo_id=hf_repo_id,
        revision=snapshot.commit,
        commit_sha=snapshot.commit,
        quantization=quantization,
        status=ModelStatus.QUANTIZING,
        phase=WAITING_GPU,
        local_path=str(snapshot.path),
        size_bytes=snapshot.size_bytes,
        bytes_total=snapshot.size_bytes,
        bytes_done=snapshot.size_bytes,
        files=[
            {"name": f.name, "size": f.size, "blob": "", "owned": False} for f in snapshot.files
        ],
        params=counts.total,
        mem_estimate_bytes=memory_for(counts, device_summary()["kind"])[quantization],
        metadata={"estimate": counts.to_dict(), "source": "local cache"},
    )


def model_load(model_id: str) -> Model:
    """Queue loading a ready model into the GPU worker (evicting the one resident there)."""
    row = model_get(model_id)
    if row.status != ModelStatus.READY:
        raise Conflict(f"{row.hf_repo_id} is {row.status}; only a ready model can be loaded.")
    Model.touch(model_id, phase=LOAD_QUEUED)  # the card says so until the worker is done
    enqueue_gpu("model_load_task", model_id)
    return model_get(model_id)


def model_unload(model_id: str) -> Model:
    """Queue unloading a model from the GPU worker."""
    row = model_get(model_id)
    if not row.is_loaded:
        raise Conflict(f"{row.hf_repo_id} is not loaded.")
    Model.touch(model_id, phase=UNLOAD_QUEUED)
    enqueue_gpu("model_unload_task", model_id)
    return model_get(model_id)
