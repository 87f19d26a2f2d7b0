"""Extraction services: start, cancel, delete; and the job itself, run by the GPU worker.

The job runs the model exactly as it was downloaded (its quantization, from the loaded-model
cache), tokenizes with the model's own tokenizer and writes shards + manifest per
architecture.md §5 under ACTIVATIONS_DIR/<job id>/.
"""

from __future__ import annotations

import logging
import shutil
from functools import lru_cache
from pathlib import Path

from django.conf import settings
from django.utils import timezone
from transformers import AutoTokenizer

from datasets_app.models import Dataset
from datasets_app.storage import texts_path
from mistudio import limits
from mistudio.errors import Conflict, Invalid, is_disk_full, room_check
from mistudio.limits import DEFAULT_CONTEXT_SIZE

from . import exports
from .jobs import enqueue_gpu
from .ml.export import EXPORT_DTYPES, ExportCancelled, ExportError, export_saelens
from .ml.extract import ExtractionCancelled, ExtractionError, ExtractionSpec
from .ml.reader import ReaderError
from .ml.storage import sequence_bytes, sha256_file, storage_dtype
from .models import (
    EXTRACTION_ACTIVE,
    PUSH_ACTIVE,
    ExtractionJob,
    ExtractionPart,
    ExtractionStatus,
    Model,
    ModelStatus,
    PushJob,
    new_extraction_id,
)
from .selectors import device, extraction_get, model_get
from .sites import extraction_sites

log = logging.getLogger(__name__)
MERGING = "merging the statistics and writing the manifest"  # the phase of a job's last step


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


def sequences_bound(max_samples: int, context_size: int, dataset: Dataset | None) -> int:
    """Upper bound of the sequences an extraction packs (ml/tokens.py): max_samples, and what the
    dataset can give. Every token but BOS/EOS covers at least one character, the dataset's texts
    file (size_bytes: one JSON string per line, UTF-8) has at least as many bytes as characters,
    packing adds one EOS per document (2 per row counted, to be safe), a sequence holds at least
    context_size - 1 stream tokens (the BOS takes one) and the last partial one is dropped:
    sequences <= ceil((size_bytes + 2 × row_count) / (context_size - 1)). None: max_samples."""
    if dataset is None or dataset.size_bytes <= 0:
        return max_samples
    tokens = dataset.size_bytes + 2 * dataset.row_count
    return min(max_samples, -(-tokens // max(context_size - 1, 1)))


def _needed_bytes(model, widths, n_sequences, context_size, output_format) -> tuple[int, int]:
    """(shard bytes, SAELens folder bytes) an extraction of at most n_sequences writes at most;
    the second is 0 without the SAELens choice. Free room needed: shards + 2 × SAELens (see
    exports.saelens_room)."""
    shards = output_bytes_estimate(model, widths, n_sequences, context_size)
    if output_format != exports.SAELENS_FORMAT:
        return shards, 0
    return shards, exports.saelens_bytes(n_sequences, context_size, widths)


def extraction_estimate(
    model_id: str, *, layers: list[int], hook_types: list[str], module_sites: list[dict],
    max_samples: int, context_size: int | None,
    output_format: str = limits.DEFAULT_OUTPUT_FORMAT, dataset_id: str | None = None, **_ignored,
) -> dict:  # fmt: skip
    """What an extraction with these settings would write at most and whether it fits, before
    Start: {n_sequences (max_samples, bounded by the dataset's size when dataset_id is given:
    see sequences_bound), n_tokens (n_sequences × context_size), upper_bound (True), n_sites,
    widths (d per site), bytes_per_element,
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
    dataset = _dataset(dataset_id) if dataset_id else None
    n_seq = sequences_bound(max_samples, context_size, dataset)
    shards, saelens = _needed_bytes(model, widths, n_seq, context_size, output_format)
    folder = Path(settings.ACTIVATIONS_DIR)
    folder.mkdir(parents=True, exist_ok=True)
    free, needed = shutil.disk_usage(folder).free, shards + 2 * saelens
    uniform = len(set(widths)) == 1
    return {
        "n_sequences": n_seq,
        "n_tokens": n_seq * context_size,
        "upper_bound": True,
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
    n_seq = sequences_bound(max_samples, context_size, dataset)
    shards, saelens = _needed_bytes(model, widths, n_seq, context_size, output_format)
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


def extraction_spec(job: ExtractionJob) -> ExtractionSpec:
    """The ml/ spec of a job row."""
    return ExtractionSpec(
        layers=job.layers,
        hook_types=job.hook_types,
        module_sites=list(job.module_sites or []),
        context_size=job.context_size,
        batch_size=job.batch_size,
        max_samples=job.max_samples,
        shard_bytes=settings.EXTRACTION_SHARD_BYTES,
        special_tokens=job.special_tokens,
    )


def extraction_meta(job: ExtractionJob, backend: str) -> dict:
    """What the manifest records about the model, tokenizer and dataset of a job."""
    row = job.model
    return {
        "model_id": row.pk,
        "repo": row.hf_repo_id,
        "revision": row.revision,
        "commit": row.commit_sha,
        "quantization": row.quantization,
        "backend": backend,
        "tokenizer": row.hf_repo_id,  # the model's own tokenizer, at the model's commit
        "tokenizer_revision": row.commit_sha,
        "dataset_id": job.dataset_id,
        "dataset": _dataset_provenance(job),
        "extraction_id": job.pk,
    }


def extraction_saelens_phase(job: ExtractionJob, should_cancel) -> None:
    """The job's last phase with the SAELens choice: the `datasets` folder from the shards
    (after the manifest). The job's progress goes on from where the extraction left it (a short
    dataset ends below 100 %) up to 100 % (see phase_progress), never back to 0.
    ExtractionCancelled, or ExtractionError with the reason."""
    start = ExtractionJob.objects.filter(pk=job.pk).values_list("progress", flat=True).first()
    start = float(start or 0.0)

    def write(done: int, total: int) -> None:
        ExtractionJob.touch(
            job.pk,
            progress=phase_progress(start, done, total),
            phase=f"writing the SAELens folder: {done}/{total} sequences",
        )

    ExtractionJob.touch(job.pk, phase="writing the SAELens folder")
    try:
        exports.saelens_write(job, write, should_cancel)
    except ExportCancelled:
        raise ExtractionCancelled() from None
    except (ExportError, ReaderError) as exc:
        raise ExtractionError(f"Writing the SAELens folder failed: {exc}") from exc


def phase_progress(start: float, done: int, total: int) -> float:
    """Percent of a job whose last phase goes from `start` % to 100 %, `done` of `total` units
    through it: start + (100 - start) × done / total, within [start, 100]."""
    start = min(max(start, 0.0), 100.0)
    return min(100.0, start + (100.0 - start) * max(done, 0) / max(total, 1))


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


def extraction_completed(job: ExtractionJob, manifest: dict) -> bool:
    """End a running job `completed` with its manifest and statistics, in one UPDATE that fails
    when a cancel landed since the last poll (the merge does not poll): False then, with
    nothing recorded, and the caller ends the job cancelled (see JobRow.advance)."""
    if job.output_format == exports.SAELENS_FORMAT:
        exports.saelens_recorded(job, exports.saelens_dir(job))
    hooks = manifest.get("hooks", [])
    stats = {h["name"]: h.get("statistics") for h in hooks}
    written = sum(s.get("bytes", 0) for h in hooks for s in h.get("shards", []))
    completed = ExtractionJob.advance(
        job.pk,
        from_status=ExtractionStatus.RUNNING,
        status=ExtractionStatus.COMPLETED,
        finished_at=timezone.now(),
        eta_seconds=None,
        manifest=manifest,
        statistics=stats,
        bytes_written=written,
        progress=100.0,
        phase="",
        batch_size_used=(manifest.get("batch_size") or {}).get("used") or job.batch_size,
    )
    if not completed:
        exports.saelens_forget(job)
    return completed


DISK_FULL = (
    "The disk filled up while writing the activations to {path}. Partial files were removed;"
    " free some space (or lower max samples or the number of sites) and start it again."
)


def failure_message(job: ExtractionJob, exc: Exception, *, expected: tuple) -> str:
    if is_disk_full(exc):
        return DISK_FULL.format(path=Path(job.output_path).parent)
    if isinstance(exc, expected):
        return getattr(exc, "message", None) or str(exc)
    log.error("extraction %s crashed", job.pk, exc_info=exc)
    return f"Extraction failed: {type(exc).__name__}: {exc}"


def extraction_cancel(extraction_id: str) -> ExtractionJob:
    """Stop a queued or running extraction: every running part stops between batches, and
    the last to stop removes every file; with no part running, it ends here."""
    job = extraction_get(extraction_id)
    ExtractionJob.request_cancel(job.pk, active=EXTRACTION_ACTIVE, what="This extraction")
    job.parts.filter(status=ExtractionPart.Status.QUEUED).update(
        status=ExtractionPart.Status.CANCELLED
    )
    if _cancelled_now(job.pk, ExtractionStatus.QUEUED) or (
        job.parts.exists()  # planned, and no worker holds a part: nobody else will end it
        and not job.parts.filter(status=ExtractionPart.Status.RUNNING).exists()
        and _cancelled_now(job.pk, ExtractionStatus.RUNNING)
    ):
        extraction_files_remove(job)
    ExtractionJob.announce(job.pk)
    return extraction_get(job.pk)


def _cancelled_now(pk: str, status: str) -> bool:
    """End the row cancelled here unless a worker merges it (that worker ends it: advance())."""
    return bool(
        ExtractionJob.objects.filter(pk=pk, status=status)
        .exclude(phase=MERGING)
        .update(
            status=ExtractionStatus.CANCELLED,
            error_message="Cancelled by the user.",
            finished_at=timezone.now(),
            updated_at=timezone.now(),
            phase="",
        )
    )


def extraction_delete(extraction_id: str) -> None:
    """Delete an extraction and its files; 409 while it runs."""
    job = extraction_get(extraction_id)
    if job.is_active:
        raise Conflict("This extraction is still running; cancel it first.")
    if job.pushes.filter(status__in=PUSH_ACTIVE).exists():
        raise Conflict("This extraction is being pushed to the Hub; wait for the push to end.")
    exports.export_cancel_for(job)
    extraction_files_remove(job)
    job.delete()
    Model.announce(job.model_id)


def extractions_remove_for_model(model: Model) -> None:
    """Before a model is deleted: refuse while one of its extractions runs, else delete files."""
    if model.extractions.filter(status__in=EXTRACTION_ACTIVE).exists():
        raise Conflict(f"An extraction of {model.hf_repo_id} is running; cancel it first.")
    if PushJob.objects.filter(extraction__model=model, status__in=PUSH_ACTIVE).exists():
        raise Conflict(f"An extraction of {model.hf_repo_id} is being pushed to the Hub; wait.")
    for job in model.extractions.all():
        exports.export_cancel_for(job)
        extraction_files_remove(job)


def extraction_export_check(extraction_id: str, out: Path, *, sites=None, dtype=None):
    """What extraction_export refuses, checked before anything is written (the CLI checks this
    before it draws its progress bar); returns the job. Conflict (409) while the extraction is not
    completed; Invalid for an existing `out`, a dtype or site the export does not take, or (422,
    code disk_full) no room for the folder in out's parent (see exports.saelens_export_room)."""
    job = extraction_get(extraction_id)
    if job.status != ExtractionStatus.COMPLETED:
        raise Conflict(
            f"Extraction {job.pk} is {job.status}: only a completed one can be exported."
        )
    out = Path(out)
    if out.exists():
        raise Invalid(f"{out} already exists: choose a new folder")
    if dtype is not None and dtype not in EXPORT_DTYPES:
        raise Invalid(f"dtype must be one of {', '.join(EXPORT_DTYPES)}, not {dtype}")
    names = [h.get("name") for h in (job.manifest or {}).get("hooks") or []]
    unknown = [s for s in sites or [] if s not in names]
    if unknown:
        raise Invalid(f"No site {', '.join(unknown)} in this extraction: it has {', '.join(names)}")
    exports.saelens_export_room_check(job, out.parent, sites, dtype)
    return job


def extraction_export(extraction_id: str, out: Path, *, sites=None, dtype=None, on_progress=None):
    """Export a completed extraction as the `datasets` folder SAELens trains from (ml/export.py);
    returns the folder. Invalid (400) for a bad site, dtype or existing folder, or a missing or
    altered shard, or (422, disk_full) no room; Conflict (409) while the extraction is not
    completed (see extraction_export_check)."""
    job = extraction_export_check(extraction_id, out, sites=sites, dtype=dtype)
    try:
        return export_saelens(job.output_path, Path(out), sites=sites, dtype=dtype,
                              on_progress=on_progress)  # fmt: skip
    except (ExportError, ReaderError) as exc:
        raise Invalid(str(exc)) from exc
