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
from .models import Model, ModelStatus
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


def jobs_reconcile(now=None) -> int:
    """End stale running jobs; return how many rows were moved to `error`."""
    now = now or timezone.now()
    cutoff = now - timedelta(seconds=settings.STALE_HEARTBEAT_SECONDS)
    moved = 0
    for row in _stale_rows(cutoff):
        hub.partial_files_remove(settings.MODELS_CACHE_DIR, row.hf_repo_id)
        job_fail(row.pk, STALE_MESSAGES[row.status])
        moved += 1
    if moved:
        log.warning("reconciler ended %d stale job(s)", moved)
    return moved
