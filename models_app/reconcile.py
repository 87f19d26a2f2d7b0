"""The reconciler: no row stays "downloading" forever after a worker dies.

Runs when a worker process starts and every minute from the django-q2 scheduler. A claimed job
whose heartbeat is older than STALE_HEARTBEAT_SECONDS is ended with a readable message and its
partial files removed.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from django.conf import settings
from django.db.models import Q
from django.utils import timezone

from . import hub
from .models import ExtractionJob, ExtractionStatus, Model, ModelStatus
from .services import WAITING_GPU, job_fail

log = logging.getLogger(__name__)

STALE_MESSAGES = {
    ModelStatus.DOWNLOADING: "The download worker stopped during the download (it crashed or was"
    " restarted). Partial files were removed; delete this entry and download again.",
    ModelStatus.QUANTIZING: "The GPU worker stopped while loading the model (it crashed, possibly"
    " out of memory). Try a smaller quantization, or delete this entry and download again.",
}


def _stale_rows(cutoff):
    running = Q(status=ModelStatus.DOWNLOADING) | (
        Q(status=ModelStatus.QUANTIZING) & ~Q(phase=WAITING_GPU)
    )
    return Model.objects.filter(running, heartbeat_at__lt=cutoff)


EXTRACTION_STALE = (
    "The GPU worker stopped during this extraction (it crashed or was restarted,"
    " possibly out of memory). Partial files were removed; start it again, perhaps"
    " with a smaller batch size."
)


def _extractions_reconcile(cutoff) -> int:
    from .extraction import extraction_end, extraction_files_remove

    moved = 0
    for job in ExtractionJob.objects.filter(
        status=ExtractionStatus.RUNNING, heartbeat_at__lt=cutoff
    ):
        extraction_files_remove(job)
        extraction_end(job, ExtractionStatus.FAILED, error_message=EXTRACTION_STALE, phase="")
        moved += 1
    return moved


def jobs_reconcile(now=None) -> int:
    """End stale running jobs; return how many rows were moved to a failed state."""
    now = now or timezone.now()
    cutoff = now - timedelta(seconds=settings.STALE_HEARTBEAT_SECONDS)
    moved = _extractions_reconcile(cutoff)
    for row in _stale_rows(cutoff):
        hub.partial_files_remove(settings.MODELS_CACHE_DIR, row.hf_repo_id)
        job_fail(row.pk, STALE_MESSAGES[row.status])
        moved += 1
    if moved:
        log.warning("reconciler ended %d stale job(s)", moved)
    return moved


def reconcile_all() -> int:
    """Every job kind: models, extractions, dataset imports. Returns rows ended."""
    from datasets_app.reconcile import datasets_reconcile

    return jobs_reconcile() + (datasets_reconcile() or 0)


def schedule_ensure() -> None:
    """Register the periodic reconciler with django-q2's scheduler (idempotent)."""
    from django_q.models import Schedule

    Schedule.objects.update_or_create(
        name="mistudio-reconcile",
        defaults={
            "func": "models_app.tasks.reconcile_task",
            "schedule_type": Schedule.MINUTES,
            "minutes": 1,
            "repeats": -1,
            "cluster": settings.DOWNLOAD_CLUSTER,
        },
    )
