"""One extraction across several GPU workers, resumed after a crash (ml/parts.py does the work).

    extraction_run (task)   claim the queued job, load the model, pack the token stream and plan
                            its parts (ExtractionPart rows: whole shards each), queue one part task
                            per other part, then work on parts like any part task
    extraction_work (task)  take part after part of the job (the model stays loaded) with a
                            conditional UPDATE; a part whose worker died (stale heartbeat) is
                            taken again and resumes at its first unfinished shard; while the only
                            parts left run elsewhere, wait for them (to take one over if its worker
                            dies); the worker that finishes the last part merges and writes the
                            one manifest

A part that fails the same way twice (its worker died twice, or the same unexpected error) fails
the job with that message; an ExtractionError or a full disk fails it at once. A failed or
cancelled job's parts stop between batches and the last one to stop removes every file.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from functools import partial
from pathlib import Path

from django.conf import settings
from django.db import transaction
from django.db.models import F, Q, Sum
from django.utils import timezone

from datasets_app.services import dataset_texts
from mistudio.errors import ServiceError, is_disk_full
from mistudio.jobs import beating

from . import exports
from .extraction import (
    MERGING,
    extraction_completed,
    extraction_end,
    extraction_files_remove,
    extraction_meta,
    extraction_saelens_phase,
    extraction_spec,
    failure_message,
    model_tokenizer,
)
from .jobs import enqueue_gpu
from .ml.errors import ExtractionCancelled, ExtractionError
from .ml.parts import finish_extraction, plan_extraction, run_shards, sequences_in
from .models import ExtractionJob, ExtractionPart, ExtractionStatus
from .resident import model_resident
from .selectors import device

log = logging.getLogger(__name__)

Part = ExtractionPart.Status
PROGRESS_INTERVAL = 0.5  # seconds between progress writes
RATE_WINDOW = 5.0  # seconds the rate of a part is measured over (skipped shards do not count)
WAIT_INTERVAL = 1.0  # seconds between looks at parts held by other workers
PART_STALE = (
    "The GPU worker running part {index} stopped sending signs of life twice (it was stopped or"
    " restarted, or lost the database). Partial files were removed; start it again."
)
PART_ENDED = "Part {index} of this extraction ended without finishing; start it again."
PLAN_STALE = (
    "The GPU worker stopped sending signs of life twice while preparing this extraction (it was"
    " stopped or restarted, or lost the database). Partial files were removed; start it again."
)
WORKER_DIED = "its worker stopped sending signs of life"


def worker_device() -> str:
    """This worker's device as the part rows name it: MISTUDIO_DEVICE (cuda:1, cpu:0, …)."""
    setting = settings.MISTUDIO_DEVICE
    return setting if ":" in setting else str(device())


def _worker() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _stale_cutoff():
    return timezone.now() - timedelta(seconds=settings.STALE_HEARTBEAT_SECONDS)


def extraction_run(extraction_id: str, *, in_worker: bool = True) -> None:
    """The GPU task of a new extraction: plan it (once), then work on its parts. Ends the job
    `failed` (readable reason, no files) when planning fails. `in_worker=False` (the CLI): the
    parts run in this process only, none is queued for the GPU workers."""
    if ExtractionJob.claim(
        extraction_id,
        from_status=ExtractionStatus.QUEUED,
        status=ExtractionStatus.RUNNING,
        started_at=timezone.now(),
        phase="loading the model",
    ):
        job = ExtractionJob.objects.get(pk=extraction_id)
        try:
            with ExtractionJob.heartbeat(job.pk):
                n_parts = _plan(job, in_worker)
        except Exception as exc:  # noqa: BLE001 - a failing job ends readable, never stuck
            expected = (ExtractionError, ServiceError, OSError)
            _job_fail(job, failure_message(job, exc, expected=expected))
            return
        # the other workers' share (a CLI run keeps its parts); extra tasks find nothing to do
        for _ in range(n_parts - 1 if in_worker else 0):
            enqueue_gpu("extraction_part_task", job.pk)
    extraction_work(extraction_id, in_worker=in_worker)


def _plan(job: ExtractionJob, in_worker: bool) -> int:
    model, _ = model_resident(job.model_id, in_worker=in_worker)
    ExtractionJob.touch(job.pk, phase="packing the token stream")
    spec = extraction_spec(job)
    layout = plan_extraction(model, model_tokenizer(job.model.local_path),
                             dataset_texts(job.dataset_id), spec, Path(job.output_path),
                             settings.EXTRACTION_PARTS)  # fmt: skip
    T = job.context_size
    with transaction.atomic():
        for i, shards in enumerate(layout["parts"]):
            ExtractionPart.objects.create(
                extraction=job, index=i, shard_start=shards[0], shard_end=shards[1],
                tokens_total=sequences_in(layout, shards) * T,
            )  # fmt: skip
    ExtractionJob.touch(job.pk, phase="extracting", tokens_total=layout["n_sequences"] * T)
    return len(layout["parts"])


def extraction_work(extraction_id: str, *, in_worker: bool = True) -> None:
    """Take part after part of a running extraction until none is left for this worker."""
    while True:
        job = ExtractionJob.objects.filter(pk=extraction_id).first()
        if job is None or job.status != ExtractionStatus.RUNNING:
            return
        if job.cancel_flag:  # cancelled while it was planned: end it unless a part runs
            _job_stopped(job.pk)
            return
        part = part_claim(job)
        if part is not None:
            if not _part_run(job, part, in_worker):
                return
            continue
        if job.parts.filter(status=Part.RUNNING).exists():
            time.sleep(WAIT_INTERVAL)  # held elsewhere: it ends, or its worker dies and we take it
            continue
        if job.parts.exists() and not job.parts.exclude(status=Part.COMPLETED).exists():
            _finish(job, in_worker)
        elif ended := job.parts.exclude(status=Part.COMPLETED).order_by("index").first():
            _job_fail(
                job, ended.last_error or PART_ENDED.format(index=ended.index)
            )  # whoever ended it died first
        return


def part_claim(job: ExtractionJob) -> ExtractionPart | None:
    """Take the first part of `job` that is queued, or running with a stale heartbeat (its worker
    died), with a conditional UPDATE on its attempt count: two workers never hold the same part.
    None when there is none (or when taking a dead worker's part failed the job)."""
    open_parts = job.parts.filter(
        Q(status=Part.QUEUED) | Q(status=Part.RUNNING, heartbeat_at__lt=_stale_cutoff())
    )
    for part in open_parts.order_by("index"):
        stale = part.status == Part.RUNNING
        taken = ExtractionPart.objects.filter(
            pk=part.pk, status=part.status, attempts=part.attempts
        ).update(
            status=Part.RUNNING, device=worker_device(), worker=_worker(), tokens_per_second=0,
            attempts=F("attempts") + 1, heartbeat_at=timezone.now(),
            crashes=F("crashes") + int(stale),
            last_error=WORKER_DIED if stale else F("last_error"),
        )  # fmt: skip
        if not taken:
            continue
        part.refresh_from_db()
        if stale and part.crashes >= 2:
            _part_end(part, Part.FAILED)
            _job_fail(job, PART_STALE.format(index=part.index))
            return None
        ExtractionJob.announce(job.pk)
        return part
    return None


def _part_run(job: ExtractionJob, part: ExtractionPart, in_worker: bool) -> bool:
    """Run one part; returns whether this worker may go on with the job."""
    try:
        with _heartbeat(part.pk, job.pk):
            model, _ = model_resident(job.model_id, in_worker=in_worker)
            run_shards(
                model, extraction_spec(job), Path(job.output_path),
                (part.shard_start, part.shard_end), on_progress=_Progress(job.pk, part),
                on_shard=lambda k, batches: _shard_done(part, k, batches),
                should_cancel=lambda: _stop_requested(job.pk),
            )  # fmt: skip
    except ExtractionCancelled:
        _part_end(part, Part.CANCELLED)
        _job_stopped(job.pk)
        return False
    except Exception as exc:  # noqa: BLE001 - a failing part ends readable, never stuck
        return _part_failed(job, part, exc)
    _part_end(part, Part.COMPLETED, tokens_done=part.tokens_total)
    return True


def _part_failed(job: ExtractionJob, part: ExtractionPart, exc: Exception) -> bool:
    expected = (ExtractionError, ServiceError)
    message = failure_message(job, exc, expected=expected)
    again = part.last_error == message  # the same way twice
    if isinstance(exc, expected) or is_disk_full(exc) or again:
        _part_end(part, Part.FAILED, last_error=message)
        _job_fail(job, message)
        return False
    log.warning("extraction %s part %d failed once: %s", job.pk, part.index, message)
    _part_end(part, Part.QUEUED, last_error=message, crashes=F("crashes") + 1)
    return True


def _part_end(part: ExtractionPart, status: str, **fields) -> None:
    ExtractionPart.objects.filter(pk=part.pk).update(
        status=status, tokens_per_second=0, updated_at=timezone.now(), **fields
    )
    ExtractionJob.announce(part.extraction_id)


def _shard_done(part: ExtractionPart, k: int, batches: int) -> None:
    ExtractionPart.objects.filter(pk=part.pk).update(
        shards_done=k - part.shard_start + 1, batches=F("batches") + batches
    )


def _stop_requested(job_pk: str) -> bool:
    """The user cancelled, or another part failed the job."""
    return not ExtractionJob.objects.filter(
        pk=job_pk, status=ExtractionStatus.RUNNING, cancel_flag=False
    ).exists()


def _job_fail(job: ExtractionJob, message: str) -> None:
    """End the job `failed` (`cancelled` when the user had asked to stop: a cancel answered 200
    ends cancelled). When no part is running, its files go before the row says so (a failed
    job is never seen with partial files); else the last part to stop removes them."""
    job.parts.filter(status=Part.QUEUED).update(status=Part.CANCELLED)
    if ExtractionJob.stopped_in(job.pk, ExtractionStatus.RUNNING):
        _job_stopped(job.pk)
        return
    if not job.parts.filter(status=Part.RUNNING).exists():
        extraction_files_remove(job)
    ExtractionJob.objects.filter(pk=job.pk, status=ExtractionStatus.RUNNING).update(
        status=ExtractionStatus.FAILED, error_message=message, phase="", eta_seconds=None,
        finished_at=timezone.now(), updated_at=timezone.now(),
    )  # fmt: skip
    _job_stopped(job.pk)


def _job_stopped(job_pk: str) -> None:
    """A part stopped (cancel, failure): the last one to stop ends a cancelled job and removes
    every file; queued parts are not taken any more."""
    job = ExtractionJob.objects.filter(pk=job_pk).first()
    if job is None:  # deleted meanwhile (its files went with it)
        return
    job.parts.filter(status=Part.QUEUED).update(status=Part.CANCELLED)
    if job.parts.filter(status=Part.RUNNING).exists():
        return
    if job.status == ExtractionStatus.RUNNING and job.cancel_flag:
        extraction_end(
            job, ExtractionStatus.CANCELLED, error_message="Cancelled by the user.", phase=""
        )
    if job.status != ExtractionStatus.COMPLETED:
        extraction_files_remove(job)
    ExtractionJob.announce(job.pk)


def _finish(job: ExtractionJob, in_worker: bool) -> None:
    """All parts are done: merge and write the manifest (one worker: a conditional UPDATE)."""
    running = ExtractionJob.objects.filter(pk=job.pk, status=ExtractionStatus.RUNNING)
    if not running.exclude(phase=MERGING).update(phase=MERGING, updated_at=timezone.now()):
        return
    try:
        with ExtractionJob.heartbeat(job.pk):
            model, report = model_resident(job.model_id, in_worker=in_worker)
            manifest = finish_extraction(model, model_tokenizer(job.model.local_path),
                                         extraction_spec(job), Path(job.output_path),
                                         extraction_meta(job, report.backend))  # fmt: skip
            if job.output_format == exports.SAELENS_FORMAT:  # the last phase: from the shards
                extraction_saelens_phase(job, partial(_stop_requested, job.pk))
    except ExtractionCancelled:
        _job_stopped(job.pk)  # no part runs: ends it cancelled, every file removed
        return
    except Exception as exc:  # noqa: BLE001
        _job_fail(job, failure_message(job, exc, expected=(ExtractionError, OSError)))
        return
    if not extraction_completed(job, manifest):
        _job_stopped(job.pk)  # cancelled during the merge: ends it cancelled, files removed


@contextmanager
def _heartbeat(part_pk: int, job_pk: str) -> Iterator[None]:
    """Keep the part's and the job's heartbeat fresh while the part runs."""

    def beat() -> None:
        now = timezone.now()
        ExtractionPart.objects.filter(pk=part_pk).update(heartbeat_at=now)
        ExtractionJob.objects.filter(pk=job_pk).update(heartbeat_at=now)

    every = settings.STALE_HEARTBEAT_SECONDS / 4
    with beating(beat, every=every, name=f"heartbeat-part-{part_pk}"):
        yield


class _Progress:
    """Throttled progress of one part, and of the job: tokens of every part, combined rate."""

    def __init__(self, job_pk: str, part: ExtractionPart):
        self.job_pk, self.part = job_pk, part
        self.last = 0.0
        self.samples: list[tuple[float, int]] = []  # (time, tokens) of the last RATE_WINDOW s

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        self.samples = [(t, d) for t, d in self.samples if now - t <= RATE_WINDOW]
        self.samples.append((now, done))
        if now - self.last < PROGRESS_INTERVAL and done < total:
            return
        self.last = now
        (t0, d0), (t1, d1) = self.samples[0], self.samples[-1]
        rate = (d1 - d0) / (t1 - t0) if t1 - t0 > 0.05 else 0.0
        ExtractionPart.objects.filter(pk=self.part.pk).update(
            tokens_done=done, tokens_per_second=rate, heartbeat_at=timezone.now()
        )
        parts = ExtractionPart.objects.filter(extraction_id=self.job_pk)
        sums = parts.aggregate(done=Sum("tokens_done"), total=Sum("tokens_total"))
        speed = parts.filter(status=Part.RUNNING).aggregate(r=Sum("tokens_per_second"))["r"] or 0
        left = (sums["total"] or 0) - (sums["done"] or 0)
        ExtractionJob.touch(
            self.job_pk,
            tokens_done=sums["done"] or 0,
            progress=min(100.0, 100.0 * (sums["done"] or 0) / max(sums["total"] or 1, 1)),
            tokens_per_second=speed,
            eta_seconds=left / speed if speed > 0 else None,
            phase="extracting",
        )


# ---------------------------------------------------------------------------------------------
# Reconciling: what a dead worker left


def parts_reconcile(cutoff) -> int:
    """Resume what dead workers left instead of failing it; returns the rows moved.

    A running job still preparing (no parts) goes back to queued, or fails when that happened
    before; a merge whose worker died is done again; a stale part of a running job is queued
    again (or fails the job, the second time); a stopped job's stale parts are ended and its
    files removed. Each resumed job gets a task."""
    moved = 0
    for job in ExtractionJob.objects.filter(status=ExtractionStatus.RUNNING,
                                            heartbeat_at__lt=cutoff):  # fmt: skip
        if not job.parts.exists():
            moved += _replan(job)
        elif job.phase == MERGING:
            ExtractionJob.touch(job.pk, phase="extracting")
            enqueue_gpu("extraction_part_task", job.pk)
            moved += 1
        elif not job.parts.filter(status__in=(Part.QUEUED, Part.RUNNING)).exists():
            # every part ended, and the worker that was to merge (or end) the job died first
            ExtractionJob.touch(job.pk)
            enqueue_gpu("extraction_part_task", job.pk)
            moved += 1
    stale = ExtractionPart.objects.filter(status=Part.RUNNING, heartbeat_at__lt=cutoff)
    for part in stale.select_related("extraction"):
        moved += _part_requeue(part)
    return moved


def _replan(job: ExtractionJob) -> int:
    if ExtractionJob.stopped_in(job.pk, ExtractionStatus.RUNNING):  # cancelled while planning
        _job_stopped(job.pk)  # no part: ends it cancelled, files removed
        return 1
    if job.attempt >= 2:
        _job_fail(job, PLAN_STALE)
        return 1
    back = ExtractionJob.objects.filter(pk=job.pk, status=ExtractionStatus.RUNNING,
                                        attempt=job.attempt, cancel_flag=False)  # fmt: skip
    if back.update(status=ExtractionStatus.QUEUED, phase="waiting for the GPU worker"):
        enqueue_gpu("extraction_run_task", job.pk)
        return 1
    return 0


def _part_requeue(part: ExtractionPart) -> int:
    job = part.extraction
    taken = ExtractionPart.objects.filter(pk=part.pk, status=Part.RUNNING,
                                          attempts=part.attempts)  # fmt: skip
    if job.status != ExtractionStatus.RUNNING or job.cancel_flag:
        if taken.update(status=Part.CANCELLED, last_error=WORKER_DIED):
            _job_stopped(job.pk)
        return 1
    if part.crashes >= 1:
        if taken.update(status=Part.FAILED, crashes=F("crashes") + 1, last_error=WORKER_DIED):
            _job_fail(job, PART_STALE.format(index=part.index))
        return 1
    if taken.update(status=Part.QUEUED, crashes=F("crashes") + 1, last_error=WORKER_DIED):
        enqueue_gpu("extraction_part_task", job.pk)
    return 1


def parts_waiting(waiting_ids: set[str]) -> list[tuple[str, str]]:
    """(task, id) of running jobs with parts left whose task is not waiting in the broker."""
    jobs = ExtractionJob.objects.filter(
        status=ExtractionStatus.RUNNING, cancel_flag=False,
        parts__status__in=(Part.QUEUED, Part.RUNNING),
    ).distinct()  # fmt: skip
    return [("extraction_part_task", pk) for pk in jobs.values_list("pk", flat=True)
            if pk not in waiting_ids]  # fmt: skip
