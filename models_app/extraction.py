"""Extraction services: start, cancel, delete; and the job itself, run by the GPU worker.

The job runs the model exactly as it was downloaded (its quantization, from the loaded-model
cache), tokenizes with the model's own tokenizer and writes shards + manifest per
architecture.md §5 under ACTIVATIONS_DIR/<job id>/.
"""

from __future__ import annotations

import logging
import shutil
import time
from functools import lru_cache, partial
from pathlib import Path

from django.conf import settings
from django.utils import timezone
from transformers import AutoTokenizer

from datasets_app.models import Dataset
from datasets_app.services import dataset_texts
from datasets_app.storage import texts_path
from mistudio import limits
from mistudio.errors import Conflict, Invalid, ServiceError, is_disk_full, room_check
from mistudio.limits import DEFAULT_CONTEXT_SIZE

from . import exports
from .jobs import enqueue_gpu
from .ml.export import ExportCancelled, ExportError, export_saelens
from .ml.extract import ExtractionCancelled, ExtractionError, ExtractionSpec, run_extraction
from .ml.reader import ReaderError
from .ml.storage import sequence_bytes, sha256_file, storage_dtype
from .models import (
    EXTRACTION_ACTIVE,
    ExtractionJob,
    ExtractionStatus,
    Model,
    ModelStatus,
    new_extraction_id,
)
from .resident import model_resident
from .selectors import device, extraction_get, model_get
from .sites import extraction_sites

log = logging.getLogger(__name__)
PROGRESS_INTERVAL = 0.5  # seconds between progress writes


def output_dir(extraction_id: str) -> Path:
    """Where a job writes unless told otherwise: ACTIVATIONS_DIR/<id>."""
    return Path(settings.ACTIVATIONS_DIR) / extraction_id


def _dataset(dataset_id: str) -> Dataset:
    dataset = Dataset.objects.filter(pk=dataset_id).first()
    if dataset is None:
        raise Invalid(f"No dataset with id {dataset_id}.", code="no_dataset")
    if not dataset.is_ready:
        raise Conflict(f"Dataset {dataset.name} is {dataset.status}, not ready.")
    return dataset


def _check_against_model(model: Model, layers: list[int], context_size: int) -> None:
    if model.status != ModelStatus.READY:
        raise Conflict(
            f"{model.hf_repo_id} is {model.status}; extraction needs a ready model.",
            code="model_not_ready",
        )
    n = model.num_layers or 0
    bad = [i for i in layers if i >= n]
    if bad:
        raise Invalid(
            f"Layers {bad} do not exist: {model.name} has layers 0–{n - 1}.", code="bad_layers"
        )
    if model.max_position and context_size > model.max_position:
        raise Invalid(
            f"Context size {context_size} exceeds the model's maximum of"
            f" {model.max_position} positions.",
            code="bad_context",
        )


def output_bytes_estimate(
    model: Model, widths: list[int], max_samples: int, context_size: int
) -> int:
    """Upper bound of the bytes an extraction writes on the GPU worker's device; widths: the
    size of one token's tensor at each site."""
    dtype = storage_dtype(device())
    return max_samples * sum(sequence_bytes(d, context_size, dtype) for d in widths)


def _disk_check(needed: int, where: Path | None = None) -> None:
    room_check(
        where or settings.ACTIVATIONS_DIR,
        needed,
        settings.DISK_MARGIN_BYTES,
        what="this extraction",
        hint=" Lower max samples or choose fewer sites.",
    )


def _needed_bytes(model, widths, max_samples, context_size, output_format) -> tuple[int, int]:
    """(shard bytes, SAELens folder bytes) an extraction writes at most; the second is 0 without
    the SAELens choice. Free room needed: shards + 2 × SAELens (see exports.saelens_room)."""
    shards = output_bytes_estimate(model, widths, max_samples, context_size)
    if output_format != exports.SAELENS_FORMAT:
        return shards, 0
    return shards, exports.saelens_bytes(max_samples, context_size, widths)


def extraction_estimate(
    model_id: str, *, layers: list[int], hook_types: list[str], module_sites: list[dict],
    max_samples: int, context_size: int | None,
    output_format: str = limits.DEFAULT_OUTPUT_FORMAT, **_ignored,
) -> dict:  # fmt: skip
    """What an extraction with these settings would write and whether it fits, before Start:
    {n_tokens (max_samples × context_size), n_sites, widths (d per site), bytes_per_element,
    shard_bytes (tokens × Σ d × bytes + int32 token ids per site), saelens_bytes (0 without the
    SAELens choice; float32), output_bytes (their sum), needed_bytes (what must be free: the
    SAELens folder counts twice while written), free_bytes, margin_bytes, fits, folder}.
    Same errors as extraction_start for a model or sites that are not there."""
    model = model_get(model_id)
    context_size = context_size or default_context_size(model)
    _check_against_model(model, layers, context_size)
    sites = extraction_sites(
        model, layers=layers, hook_types=hook_types, module_sites=[dict(s) for s in module_sites]
    )
    widths = [site["d"] or model.hidden_dim or 1 for site in sites]
    shards, saelens = _needed_bytes(model, widths, max_samples, context_size, output_format)
    folder = Path(settings.ACTIVATIONS_DIR)
    folder.mkdir(parents=True, exist_ok=True)
    free, needed = shutil.disk_usage(folder).free, shards + 2 * saelens
    uniform = len(set(widths)) == 1
    return {
        "n_tokens": max_samples * context_size,
        "n_sites": len(sites),
        "widths": widths,
        "d": widths[0] if uniform else None,
        "d_sum": sum(widths),
        "bytes_per_element": storage_dtype(device()).itemsize,
        "shard_bytes": shards,
        "saelens_bytes": saelens,
        "output_bytes": shards + saelens,
        "needed_bytes": needed,
        "free_bytes": free,
        "margin_bytes": settings.DISK_MARGIN_BYTES,
        "fits": needed + settings.DISK_MARGIN_BYTES <= free,
        "folder": str(folder),
    }


def default_context_size(model: Model) -> int:
    return min(DEFAULT_CONTEXT_SIZE, model.max_position or DEFAULT_CONTEXT_SIZE)


def _out_dir_check(out: Path) -> Path:
    out = out.expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise Invalid(
            f"{out} exists and is not an empty folder; choose a new output folder.",
            code="bad_output",
        )
    return out


def extraction_start(
    *,
    model_id: str,
    dataset_id: str,
    layers: list[int],
    hook_types: list[str],
    batch_size: int,
    max_samples: int,
    context_size: int | None = None,
    special_tokens: str = limits.DEFAULT_SPECIAL_TOKENS,
    module_sites: list[dict] | None = None,
    output_format: str = limits.DEFAULT_OUTPUT_FORMAT,
    out: Path | None = None,
    enqueue: bool = True,
) -> ExtractionJob:
    """Validate against the real model and dataset, check disk, queue the job on the GPU worker.

    Inputs are already shape-checked by `schemas.ExtractionIn`. Raises Conflict (409) for a model
    or dataset that is not ready, Invalid (422) for layers/context the model lacks, a site that
    does not exist on it (see sites.extraction_sites) or a full disk (the shards, plus the SAELens
    folder twice when output_format is "safetensors+saelens").
    `out` (CLI) writes somewhere else than ACTIVATIONS_DIR/<id>; `enqueue=False` leaves the job
    queued for the caller to run in-process (Conflict while another extraction runs).
    """
    if not enqueue and ExtractionJob.objects.filter(status=ExtractionStatus.RUNNING).exists():
        raise Conflict("Another extraction is running on this device; wait for it.")
    model = model_get(model_id)
    context_size = context_size or default_context_size(model)
    _check_against_model(model, layers, context_size)
    module_sites = [dict(site) for site in module_sites or []]
    sites = extraction_sites(model, layers=layers, hook_types=hook_types, module_sites=module_sites)
    dataset = _dataset(dataset_id)
    out = _out_dir_check(out) if out else None
    widths = [site["d"] or model.hidden_dim or 1 for site in sites]
    shards, saelens = _needed_bytes(model, widths, max_samples, context_size, output_format)
    _disk_check(shards + 2 * saelens, out.parent if out else None)
    job_id = new_extraction_id()
    job = ExtractionJob.objects.create(
        id=job_id,
        model=model,
        dataset=dataset,
        dataset_name=dataset.name,
        layers=layers,
        hook_types=hook_types,
        module_sites=module_sites,
        batch_size=batch_size,
        max_samples=max_samples,
        context_size=context_size,
        special_tokens=special_tokens,
        output_format=output_format,
        phase="waiting for the GPU worker",
        output_path=str(out or output_dir(job_id)),
    )
    if enqueue:
        enqueue_gpu("extraction_run_task", job.pk)
    ExtractionJob.announce(job.pk)
    return extraction_get(job.pk)


class _Progress:
    """Throttled progress writes with tokens/s and ETA."""

    def __init__(self, job_id: str):
        self.job_id = job_id
        self.started = time.monotonic()
        self.last = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self.last < PROGRESS_INTERVAL and done < total:
            return
        self.last = now
        rate = done / max(now - self.started, 1e-6)
        eta = (total - done) / rate if rate > 0 else None
        ExtractionJob.touch(
            self.job_id,
            tokens_done=done,
            tokens_total=total,
            progress=min(100.0, 100.0 * done / max(total, 1)),
            tokens_per_second=rate,
            eta_seconds=eta,
            phase="extracting",
        )


def extraction_end(job: ExtractionJob, status: str, **fields) -> None:
    ExtractionJob.touch(
        job.pk, status=status, finished_at=timezone.now(), eta_seconds=None, **fields
    )


def extraction_files_remove(job: ExtractionJob) -> None:
    if job.output_path:
        shutil.rmtree(job.output_path, ignore_errors=True)


@lru_cache(maxsize=4)
def model_tokenizer(local_path: str):
    """The model's own tokenizer from its local snapshot (never remote code), cached."""
    return AutoTokenizer.from_pretrained(local_path, trust_remote_code=False)


def _run(job: ExtractionJob, in_worker: bool) -> dict:
    model, report = model_resident(job.model_id, in_worker=in_worker)
    spec = ExtractionSpec(
        layers=job.layers,
        hook_types=job.hook_types,
        module_sites=list(job.module_sites or []),
        context_size=job.context_size,
        batch_size=job.batch_size,
        max_samples=job.max_samples,
        shard_bytes=settings.EXTRACTION_SHARD_BYTES,
        special_tokens=job.special_tokens,
    )
    row = job.model
    meta = {
        "model_id": row.pk,
        "repo": row.hf_repo_id,
        "revision": row.revision,
        "commit": row.commit_sha,
        "quantization": row.quantization,
        "backend": report.backend,
        "tokenizer": row.hf_repo_id,  # the model's own tokenizer, at the model's commit
        "tokenizer_revision": row.commit_sha,
        "dataset_id": job.dataset_id,
        "dataset": _dataset_provenance(job),
        "extraction_id": job.pk,
    }
    ExtractionJob.touch(job.pk, phase="extracting")
    should_cancel = partial(ExtractionJob.cancel_requested, job.pk)
    manifest = run_extraction(
        model,
        model_tokenizer(row.local_path),
        dataset_texts(job.dataset_id),
        spec,
        Path(job.output_path),
        meta=meta,
        on_progress=_Progress(job.pk),
        should_cancel=should_cancel,
    )
    if job.output_format == exports.SAELENS_FORMAT:
        _saelens_phase(job, should_cancel)
    return manifest


def _saelens_phase(job: ExtractionJob, should_cancel) -> None:
    """The job's last phase with the SAELens choice: the `datasets` folder from the shards."""

    def write(done: int, total: int) -> None:
        ExtractionJob.touch(
            job.pk,
            progress=min(100.0, 100.0 * done / max(total, 1)),
            phase=f"writing the SAELens folder: {done}/{total} sequences",
        )

    write(0, 1)
    try:
        exports.saelens_write(job, write, should_cancel)
    except ExportCancelled:
        raise ExtractionCancelled() from None
    except (ExportError, ReaderError) as exc:
        raise ExtractionError(f"Writing the SAELens folder failed: {exc}") from exc


def _dataset_provenance(job: ExtractionJob) -> dict:
    """Name, source and the sha256 of the normalized texts the job reads (to redo the run)."""
    ds = job.dataset
    if ds is None:
        return {}
    source = (
        {"hf_dataset_id": ds.hf_dataset_id, "split": ds.split, "commit": ds.commit_sha,
         "text_field": ds.text_field}
        if ds.source == "hub"
        else {"file": ds.original_filename, "text_field": ds.text_field}
    )  # fmt: skip
    path = texts_path(ds.pk)
    return {"name": ds.name, "source": ds.source, **source, "rows": ds.row_count,
            "texts_sha256": sha256_file(path) if path.is_file() else None}  # fmt: skip


def _completed(job: ExtractionJob, manifest: dict) -> None:
    if job.output_format == exports.SAELENS_FORMAT:
        exports.saelens_recorded(job, exports.saelens_dir(job))
    hooks = manifest.get("hooks", [])
    stats = {h["name"]: h.get("statistics") for h in hooks}
    written = sum(s.get("bytes", 0) for h in hooks for s in h.get("shards", []))
    extraction_end(
        job,
        ExtractionStatus.COMPLETED,
        manifest=manifest,
        statistics=stats,
        bytes_written=written,
        progress=100.0,
        phase="",
        batch_size_used=(manifest.get("batch_size") or {}).get("used") or job.batch_size,
    )


def extraction_run(extraction_id: str, *, in_worker: bool = True) -> None:
    """The GPU job. Ends `completed`, `failed` (readable reason, no files) or `cancelled`.
    `in_worker=False`: a command-line run, whose model is not the GPU worker's (see
    resident.model_resident)."""
    if not ExtractionJob.claim(
        extraction_id,
        from_status=ExtractionStatus.QUEUED,
        status=ExtractionStatus.RUNNING,
        started_at=timezone.now(),
        phase="loading the model",
    ):
        return
    job = extraction_get(extraction_id)
    try:
        with ExtractionJob.heartbeat(job.pk):
            manifest = _run(job, in_worker)
    except ExtractionCancelled:
        extraction_files_remove(job)
        extraction_end(
            job, ExtractionStatus.CANCELLED, error_message="Cancelled by the user.", phase=""
        )
    except Exception as exc:  # noqa: BLE001 - a failing job ends readable, never stuck
        extraction_files_remove(job)
        message = _failure_message(job, exc, expected=(ExtractionError, ServiceError, OSError))
        extraction_end(job, ExtractionStatus.FAILED, error_message=message, phase="")
    else:
        _completed(job, manifest)


DISK_FULL = (
    "The disk filled up while writing the activations to {path}. Partial files were removed;"
    " free some space (or lower max samples or the number of sites) and start it again."
)


def _failure_message(job: ExtractionJob, exc: Exception, *, expected: tuple) -> str:
    if is_disk_full(exc):
        return DISK_FULL.format(path=Path(job.output_path).parent)
    if isinstance(exc, expected):
        return getattr(exc, "message", None) or str(exc)
    log.error("extraction %s crashed", job.pk, exc_info=exc)
    return f"Extraction failed: {type(exc).__name__}: {exc}"


def extraction_cancel(extraction_id: str) -> ExtractionJob:
    """Stop a queued or running extraction; the worker stops between batches and cleans up."""
    job = extraction_get(extraction_id)
    if job.status not in EXTRACTION_ACTIVE:
        raise Conflict(f"This extraction is {job.status}; there is nothing to cancel.")
    ExtractionJob.request_cancel(job.pk)
    if ExtractionJob.objects.filter(pk=job.pk, status=ExtractionStatus.QUEUED).update(
        status=ExtractionStatus.CANCELLED,
        error_message="Cancelled by the user.",
        finished_at=timezone.now(),
        updated_at=timezone.now(),
        phase="",
    ):
        extraction_files_remove(job)
    ExtractionJob.announce(job.pk)
    return extraction_get(job.pk)


def extraction_delete(extraction_id: str) -> None:
    """Delete an extraction and its files; 409 while it runs."""
    job = extraction_get(extraction_id)
    if job.is_active:
        raise Conflict("This extraction is still running; cancel it first.")
    exports.export_cancel_for(job)
    extraction_files_remove(job)
    job.delete()
    Model.announce(job.model_id)


def extractions_remove_for_model(model: Model) -> None:
    """Before a model is deleted: refuse while one of its extractions runs, else delete files."""
    if model.extractions.filter(status__in=EXTRACTION_ACTIVE).exists():
        raise Conflict(f"An extraction of {model.hf_repo_id} is running; cancel it first.")
    for job in model.extractions.all():
        exports.export_cancel_for(job)
        extraction_files_remove(job)


def extraction_export(extraction_id: str, out: Path, *, sites=None, dtype=None, on_progress=None):
    """Export a completed extraction as the `datasets` folder SAELens trains from (ml/export.py);
    returns the folder. Invalid (400) for a bad site, dtype or existing folder, or a missing or
    altered shard; Conflict (409) while the extraction is not completed."""
    job = extraction_get(extraction_id)
    if job.status != ExtractionStatus.COMPLETED:
        raise Conflict(
            f"Extraction {job.pk} is {job.status}: only a completed one can be exported."
        )
    try:
        return export_saelens(job.output_path, Path(out), sites=sites, dtype=dtype,
                              on_progress=on_progress)  # fmt: skip
    except (ExportError, ReaderError) as exc:
        raise Invalid(str(exc)) from exc
