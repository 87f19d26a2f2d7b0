"""SAELens exports of extractions: the `datasets` folder SAELens trains from (ml/export.py),
written at `<extraction folder>/saelens`.

Two ways in: the extraction job writes it at its end when its output_format is
"safetensors+saelens" (`saelens_write`), or a completed extraction is exported afterwards by a
background task on the download cluster (`extraction_export_start` → `extraction_export_run`).
Either way one `ExtractionExport` row tells its state; the safetensors shards stay the source of
truth and are never changed. A failed or cancelled export leaves no folder.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from django.conf import settings
from django.utils import timezone

from mistudio.errors import Conflict, Invalid, is_disk_full, room_check
from mistudio.jobs import enqueue

from .ml.export import ExportCancelled, ExportError, export_saelens
from .ml.reader import ReaderError, open_extraction
from .models import EXTRACTION_ACTIVE, ExtractionExport, ExtractionJob, ExtractionStatus
from .selectors import extraction_get

log = logging.getLogger(__name__)

SAELENS_DIR = "saelens"
SAELENS_FORMAT = "safetensors+saelens"  # the output_format that writes it in the job
SAELENS_BYTES_PER_ELEMENT = 4  # Arrow has no bfloat16: exported as float32
PROGRESS_INTERVAL = 0.5  # seconds between progress writes
EXPORT_TASK = "models_app.tasks.extraction_export_task"


def saelens_dir(job: ExtractionJob) -> Path:
    """Where an extraction's SAELens folder goes: <output_path>/saelens."""
    return Path(job.output_path) / SAELENS_DIR


def saelens_bytes(
    n_sequences: int, context_size: int, widths: list[int], element_bytes: int = 4
) -> int:
    """Bytes of the SAELens folder's rows: per sequence and site [context_size, d] float32
    (element_bytes 2 for a float16 export), plus int32 token_ids [context_size] (Arrow's own
    overhead is a few KB per file on top)."""
    per_token = sum(widths) * element_bytes + 4
    return n_sequences * context_size * per_token


def saelens_room(
    n_sequences: int, context_size: int, widths: list[int], element_bytes: int = 4
) -> int:
    """Free bytes the SAELens folder needs while written: `datasets` builds the table in a work
    folder, then save_to_disk copies it, so twice its size for a moment."""
    return 2 * saelens_bytes(n_sequences, context_size, widths, element_bytes)


def saelens_export_room(job: ExtractionJob, sites=None, dtype: str | None = None) -> int:
    """Free bytes an export of `job`'s sites (default: all; names not in its manifest are left
    to the exporter to refuse) as `dtype` ("float32" default, or "float16") needs, from its
    manifest (saelens_room)."""
    hooks = (job.manifest or {}).get("hooks") or []
    chosen = [h for h in hooks if sites is None or h.get("name") in sites]
    widths = [int(h.get("d") or 1) for h in chosen]
    n_seq = sum(s.get("n_seq", 0) for s in (hooks or [{}])[0].get("shards", []))
    element = 2 if dtype == "float16" else SAELENS_BYTES_PER_ELEMENT
    return saelens_room(n_seq, job.context_size, widths, element)


def saelens_export_room_check(job: ExtractionJob, where: Path, sites=None, dtype=None) -> None:
    """Invalid (422, code disk_full) when the export (saelens_export_room) plus the
    MISTUDIO_DISK_MARGIN_MB margin does not fit in `where` (created if missing)."""
    room_check(
        Path(where),
        saelens_export_room(job, sites, dtype),
        settings.DISK_MARGIN_BYTES,
        what="the SAELens export",
        hint=" Free some space first.",
    )


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


class _Throttled:
    """Calls `write(done, total)` at most every PROGRESS_INTERVAL s (and at the end), and raises
    ExportCancelled as soon as `should_cancel()` says so."""

    def __init__(self, write: Callable[[int, int], None], should_cancel: Callable[[], bool]):
        self.write, self.should_cancel, self.last = write, should_cancel, 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self.last < PROGRESS_INTERVAL and done < total:
            return
        self.last = now
        if self.should_cancel():
            raise ExportCancelled()
        self.write(done, total)


def saelens_write(
    job: ExtractionJob, write: Callable[[int, int], None], should_cancel: Callable[[], bool]
) -> Path:
    """The extraction job's last phase: write its SAELens folder from its shards (all sites).
    write(done_sequences, total) reports progress; raises ExportCancelled when should_cancel(),
    ExportError / ReaderError / OSError otherwise; the folder is removed on any failure."""
    out = saelens_dir(job)
    return export_saelens(job.output_path, out, on_progress=_Throttled(write, should_cancel))


def saelens_recorded(job: ExtractionJob, folder: Path) -> None:
    """Record the folder the extraction job wrote as its (completed) export."""
    ExtractionExport.objects.update_or_create(
        extraction=job,
        defaults={
            "status": ExtractionStatus.COMPLETED,
            "path": str(folder),
            "progress": 100.0,
            "bytes_written": folder_bytes(folder),
            "finished_at": timezone.now(),
            "phase": "",
            "error_message": "",
        },
    )


def saelens_forget(job: ExtractionJob) -> None:
    """Drop the export record of a job that did not complete (its files go with the job's)."""
    ExtractionExport.objects.filter(extraction=job).delete()


def extraction_export_start(extraction_id: str, *, format: str = "saelens") -> ExtractionExport:
    """Queue the SAELens export of a completed extraction on the download cluster.

    Conflict (409) when the extraction is not completed, or is already exported (its folder
    whole on disk) or being exported; Invalid (422) when its files are gone, or (code disk_full)
    when the folder (twice its size while written, see saelens_room) does not fit. A failed or
    cancelled earlier export is replaced, and so is a completed one whose folder was removed or
    is incomplete (ExtractionExport.missing)."""
    job = extraction_get(extraction_id)
    if job.status != ExtractionStatus.COMPLETED:
        raise Conflict(
            f"Extraction {job.pk} is {job.status}: only a completed one can be exported.",
            code="not_completed",
        )
    done = job.saelens_export
    if done is not None and done.status in EXTRACTION_ACTIVE:
        raise Conflict(
            "This extraction is being exported for SAELens already; wait for it.", code="exporting"
        )
    if done is not None and done.status == ExtractionStatus.COMPLETED and not done.missing:
        raise Conflict(
            f"This extraction is exported for SAELens already: {done.path}", code="exported"
        )
    if not (Path(job.output_path) / "manifest.json").is_file():
        raise Invalid(f"The files of this extraction are no longer in {job.output_path}; there"
                      " is nothing to export.", code="files_missing")  # fmt: skip
    try:
        open_extraction(job.output_path)  # the manifest only: shards are checked as they are read
    except ReaderError as exc:
        raise Invalid(f"This extraction's files cannot be read: {exc}", code="files_bad") from exc
    saelens_export_room_check(job, Path(job.output_path))
    if done is not None:
        done.delete()
    return ExtractionExport.create_queued(
        task=lambda pk: enqueue(EXPORT_TASK, pk, cluster=settings.DOWNLOAD_CLUSTER),
        conflict="This extraction is being exported for SAELens already; wait for it.",
        extraction=job,
        format=format,
        path=str(saelens_dir(job)),
        phase="waiting for a worker",
    )


def _export_stopped(pk: str) -> bool:
    """The user cancelled the export, or deleted its extraction (the row went with it)."""
    return not ExtractionExport.objects.filter(pk=pk, cancel_flag=False).exists()


def _export_progress(pk: str) -> Callable[[int, int], None]:
    def write(done: int, total: int) -> None:
        ExtractionExport.touch(
            pk,
            progress=min(100.0, 100.0 * done / max(total, 1)),
            phase=f"writing the SAELens folder: {done}/{total} sequences",
        )

    return write


def _export_end(pk: str, status: str, **fields) -> None:
    ExtractionExport.touch(
        pk, status=status, finished_at=timezone.now(), eta_seconds=None, phase="", **fields
    )


def extraction_export_run(extraction_id: str) -> None:
    """The background export task. Ends completed (path and bytes recorded), failed (a readable
    reason, no folder) or cancelled; an extraction deleted meanwhile leaves no folder behind."""
    if not ExtractionExport.claim(
        extraction_id,
        from_status=ExtractionStatus.QUEUED,
        status=ExtractionStatus.RUNNING,
        phase="opening the shards",
    ):
        return
    row = ExtractionExport.objects.select_related("extraction").get(pk=extraction_id)
    job, out = row.extraction, Path(row.path)
    shutil.rmtree(out, ignore_errors=True)  # what a worker that died mid-export left
    try:
        with ExtractionExport.heartbeat(row.pk):
            throttled = _Throttled(_export_progress(row.pk), lambda: _export_stopped(row.pk))
            folder = export_saelens(job.output_path, out, on_progress=throttled)
    except ExportCancelled:
        _export_end(row.pk, ExtractionStatus.CANCELLED, error_message="Cancelled.")
    except Exception as exc:  # noqa: BLE001 - a failing export ends readable, never stuck
        shutil.rmtree(out, ignore_errors=True)
        _export_end(row.pk, ExtractionStatus.FAILED, error_message=_export_failure(out, exc))
    else:
        _export_completed(row.pk, out, folder)
    if not ExtractionJob.objects.filter(pk=job.pk).exists():  # deleted while exporting
        shutil.rmtree(job.output_path, ignore_errors=True)


def _export_completed(pk: str, out: Path, folder: Path) -> None:
    """Completed, unless the row ended meanwhile (the reconciler took this worker for dead, or a
    delete cancelled it): then what it wrote goes, and a cancelled one says so."""
    if ExtractionExport.advance(
        pk,
        from_status=ExtractionStatus.RUNNING,
        status=ExtractionStatus.COMPLETED,
        finished_at=timezone.now(),
        eta_seconds=None,
        phase="",
        progress=100.0,
        bytes_written=folder_bytes(folder),
    ):
        return
    shutil.rmtree(out, ignore_errors=True)
    if ExtractionExport.stopped_in(pk, ExtractionStatus.RUNNING):
        _export_end(pk, ExtractionStatus.CANCELLED, error_message="Cancelled.")


def _export_failure(out: Path, exc: Exception) -> str:
    if is_disk_full(exc):
        return (
            f"The disk filled up while writing the SAELens folder in {out.parent}; it was"
            " removed. Free some space and export again."
        )
    if isinstance(exc, (ExportError, ReaderError, OSError)):
        return f"Export failed: {exc}"
    log.error("export %s crashed", out, exc_info=exc)
    return f"Export failed: {type(exc).__name__}: {exc}"


def export_cancel_for(job: ExtractionJob) -> None:
    """Before an extraction is deleted: stop its running export (the task removes what it
    wrote once it sees the row gone)."""
    ExtractionExport.objects.filter(pk=job.pk, status__in=EXTRACTION_ACTIVE).update(
        cancel_flag=True
    )


EXPORT_STALE = (
    "The worker stopped sending signs of life during this export (it was stopped or restarted,"
    " or lost the database). The partial folder was removed; export again."
)


def exports_reconcile(cutoff) -> int:
    """End running exports whose heartbeat is older than `cutoff`; remove their folders."""
    moved = 0
    for row in ExtractionExport.objects.filter(
        status=ExtractionStatus.RUNNING, heartbeat_at__lt=cutoff
    ):
        shutil.rmtree(row.path, ignore_errors=True)
        _export_end(row.pk, ExtractionStatus.FAILED, error_message=EXPORT_STALE)
        moved += 1
    return moved


def exports_queued() -> list[str]:
    """Ids of exports waiting for a worker (requeued at the download cluster's start)."""
    rows = ExtractionExport.objects.filter(status=ExtractionStatus.QUEUED, cancel_flag=False)
    return list(rows.values_list("pk", flat=True))


def saelens_recipe(job: ExtractionJob, folder: Path, sites: list[str] | None = None) -> str:
    """The SAELens 6 training config for an exported folder, filled in for `job` (model id,
    the first exported site, context size, d_in = the site's flattened width), and what to pass
    for a model TransformerLens does not know: SAELens loads `model_name` even when it trains
    from cached activations."""
    hooks = {h["name"]: h for h in (job.manifest or {}).get("hooks", [])}
    names = sites or list(hooks)
    site = names[0] if names else "…"
    shape = (hooks.get(site) or {}).get("shape") or [(hooks.get(site) or {}).get("d", 0)]
    d_in = 1
    for n in shape:
        d_in *= int(n)
    others = f"  (other sites in the folder: {', '.join(names[1:])})\n" if names[1:] else ""
    return (
        "SAELens 6: LanguageModelSAETrainingRunner(LanguageModelSAERunnerConfig(\n"
        f"    model_name={job.model.hf_repo_id!r}, hook_name={site!r},"
        f" context_size={job.context_size},\n"
        f"    use_cached_activations=True, cached_activations_path={str(folder)!r},\n"
        f"    sae=StandardTrainingSAEConfig(d_in={d_in}, d_sae=…), dataset_path=<the HF text"
        " dataset>, …)).run()\n"
        f"{others}"
        "  SAELens loads model_name with TransformerLens even from cached activations: for a"
        " model TransformerLens does not know, pass override_model=HookedTransformer("
        f"HookedTransformerConfig(d_model={d_in}, n_ctx={job.context_size}, …)) (and"
        " override_dataset= if dataset_path is not a Hub dataset) to the runner; the"
        " activations come from the folder."
    )
