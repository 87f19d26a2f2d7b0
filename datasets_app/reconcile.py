"""The dataset reconciler: no row stays "importing" forever after a worker dies, and no folder
outlives its row.

Runs where the model reconciler runs (worker start-up and the periodic schedule). An importing
row whose heartbeat is older than STALE_HEARTBEAT_SECONDS is ended with a readable message and its
files removed; a dataset folder with no row (a request that died
between writing files and creating the row) is removed once it has been idle as long.
"""

from __future__ import annotations

import logging
import shutil
from datetime import datetime, timedelta
from pathlib import Path

from django.conf import settings
from django.utils import timezone

from .jobs import enqueue_job, job_fail
from .models import Dataset, DatasetSource, DatasetStatus

log = logging.getLogger(__name__)

STALE_MESSAGE = (
    "The worker stopped sending signs of life during the import (it was stopped or restarted,"
    " or lost the database). Partial files were removed; delete this entry and import the"
    " dataset again."
)


def _last_write(folder: Path) -> float:
    times = [p.stat().st_mtime for p in folder.rglob("*")]
    return max([folder.stat().st_mtime, *times])


def _orphans_remove(cutoff: datetime) -> int:
    root = Path(settings.DATASETS_DIR)
    if not root.is_dir():
        return 0
    folders = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("d_")]
    known = set(
        Dataset.objects.filter(pk__in=[p.name for p in folders]).values_list("pk", flat=True)
    )
    removed = 0
    for folder in folders:
        if folder.name not in known and _last_write(folder) < cutoff.timestamp():
            shutil.rmtree(folder, ignore_errors=True)
            removed += 1
    return removed


def datasets_reconcile(now: datetime | None = None) -> int:
    """End stale imports and remove orphan folders; return how many rows were moved to error."""
    now = now or timezone.now()
    cutoff = now - timedelta(seconds=settings.STALE_HEARTBEAT_SECONDS)
    stale = Dataset.objects.filter(status=DatasetStatus.IMPORTING, heartbeat_at__lt=cutoff)
    moved = 0
    for pk in list(stale.values_list("pk", flat=True)):
        job_fail(pk, STALE_MESSAGE)
        moved += 1
    orphans = _orphans_remove(cutoff)
    if moved or orphans:
        log.warning(
            "dataset reconciler ended %d stale import(s), removed %d orphan folder(s)",
            moved,
            orphans,
        )
    return moved


def datasets_requeue(waiting: set[str]) -> list[tuple[str, str]]:
    """Queue again the queued imports whose task is not among the `waiting` broker ids (a dead
    worker took it); return (task, id) of each. The job's exactly-once claim makes any duplicate
    a no-op."""
    queued = Dataset.objects.filter(status=DatasetStatus.QUEUED, cancel_flag=False)
    lost = []
    for pk, source in queued.exclude(pk__in=waiting).values_list("pk", "source"):
        task = "dataset_import_task" if source == DatasetSource.HUB else "dataset_normalize_task"
        enqueue_job(task, pk)
        lost.append((task, pk))
    return lost
