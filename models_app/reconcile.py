"""The reconciler: no row stays "downloading" forever after a worker dies.

Runs when a worker process starts, once more when the heartbeats from before that start have gone
stale, and every minute from the django-q2 scheduler. A claimed job whose heartbeat is older than
STALE_HEARTBEAT_SECONDS is ended with a readable message and its partial files removed. At a
worker's start, queued jobs whose task is no longer waiting in the broker (taken by a worker that
died with it) are queued again; the jobs' exactly-once claim makes any duplicate a no-op.
"""

from __future__ import annotations

import logging
import threading
from datetime import timedelta

from django.conf import settings
from django.db import connections
from django.db.models import Q
from django.utils import timezone
from django_q.brokers import get_broker
from django_q.models import OrmQ, Schedule
from django_q.signing import SignedPackage

from datasets_app.reconcile import datasets_reconcile, datasets_requeue
from mistudio.jobs import enqueue

from .exports import EXPORT_TASK, exports_queued, exports_reconcile
from .extraction import extraction_end, extraction_files_remove
from .jobs import WAITING_GPU, enqueue_download, enqueue_gpu, job_fail, partial_files_remove
from .models import ExtractionJob, ExtractionStatus, Model, ModelStatus

log = logging.getLogger(__name__)

# What the reconciler knows is only that the job's heartbeat stopped: the worker died or was
# restarted, or could not reach the database. It never guesses a cause it did not see (a worker
# that catches its own error, out of memory included, ends the row itself with that error).
STALE_MESSAGES = {
    ModelStatus.DOWNLOADING: "The download worker stopped sending signs of life during the"
    " download (it was stopped or restarted, or lost the database). Partial files were removed;"
    " retry the download.",
    ModelStatus.QUANTIZING: "The GPU worker stopped sending signs of life while loading the model"
    " (it was stopped or restarted, or lost the database). Retry, or delete this entry.",
}


def _stale_rows(cutoff):
    running = Q(status=ModelStatus.DOWNLOADING) | (
        Q(status=ModelStatus.QUANTIZING) & ~Q(phase=WAITING_GPU)
    )
    return Model.objects.filter(running, heartbeat_at__lt=cutoff)


EXTRACTION_STALE = (
    "The GPU worker stopped sending signs of life during this extraction (it was stopped or"
    " restarted, or lost the database). Partial files were removed; start it again."
)


def _extractions_reconcile(cutoff) -> int:
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
    moved = _extractions_reconcile(cutoff) + exports_reconcile(cutoff)
    for row in _stale_rows(cutoff):
        partial_files_remove(row)
        job_fail(row.pk, STALE_MESSAGES[row.status])
        moved += 1
    if moved:
        log.warning("reconciler ended %d stale job(s)", moved)
    return moved


def reconcile_all() -> int:
    """Every job kind: models, extractions, dataset imports. Returns rows ended."""
    return jobs_reconcile() + (datasets_reconcile() or 0)


SCHEDULE_NAME = "mistudio-reconcile"


def schedule_ensure() -> None:
    """Register the periodic reconciler with django-q2's scheduler (idempotent). Schedule names
    are not unique: workers starting together may both insert one; the extra ones are removed
    here rather than made an error (get() would raise for every later worker). With
    RECONCILE_MINUTES = 0 the schedule is removed."""
    if settings.RECONCILE_MINUTES <= 0:
        Schedule.objects.filter(name=SCHEDULE_NAME).delete()
        return
    fields = {
        "func": "models_app.tasks.reconcile_task",
        "schedule_type": Schedule.MINUTES,
        "minutes": settings.RECONCILE_MINUTES,
        "repeats": -1,
        "cluster": settings.DOWNLOAD_CLUSTER,
    }
    pks = list(
        Schedule.objects.filter(name=SCHEDULE_NAME).order_by("pk").values_list("pk", flat=True)
    )
    if not pks:
        Schedule.objects.create(name=SCHEDULE_NAME, **fields)
        return
    Schedule.objects.filter(pk__in=pks[1:]).delete()
    Schedule.objects.filter(pk=pks[0]).update(**fields)


def broker_waiting_ids(cluster: str) -> set[str]:
    """The ids carried by tasks still waiting in `cluster`'s broker queue (not yet taken by a
    worker). Tasks a worker took are not listed: if that worker died, they are lost (Redis) or
    locked for `retry` seconds (ORM)."""
    broker = get_broker(cluster)
    if settings.REDIS_URL:
        payloads = broker.connection.lrange(broker.list_key, 0, -1)
    else:
        waiting = OrmQ.objects.filter(key=broker.list_key, lock__lte=timezone.now())
        payloads = waiting.values_list("payload", flat=True)
    ids: set[str] = set()
    for payload in payloads:
        try:
            ids.update(str(arg) for arg in SignedPackage.loads(payload).get("args") or ())
        except Exception:  # noqa: BLE001 - a payload signed with another key is not ours
            continue
    return ids


def _queued_jobs(cluster: str) -> list[tuple[str, str]]:
    """(task function, id) of every job of `cluster` that waits for a worker."""
    if cluster == settings.GPU_CLUSTER:
        extractions = ExtractionJob.objects.filter(
            status=ExtractionStatus.QUEUED, cancel_flag=False
        )
        checks = Model.objects.filter(
            status=ModelStatus.QUANTIZING, phase=WAITING_GPU, cancel_flag=False
        )
        return [("extraction_run_task", pk) for pk in extractions.values_list("pk", flat=True)] + [
            ("model_load_check_task", pk) for pk in checks.values_list("pk", flat=True)
        ]
    if cluster == settings.DOWNLOAD_CLUSTER:
        downloads = Model.objects.filter(status=ModelStatus.QUEUED, cancel_flag=False)
        return [("model_download_task", pk) for pk in downloads.values_list("pk", flat=True)] + [
            ("extraction_export_task", pk) for pk in exports_queued()
        ]
    return []


def jobs_requeue(cluster: str) -> int:
    """Queue again the queued jobs of `cluster` whose task is not waiting in the broker; return
    how many. Run at worker start, when a dead worker may have taken tasks with it."""
    waiting = broker_waiting_ids(cluster)
    lost = [(func, pk) for func, pk in _queued_jobs(cluster) if pk not in waiting]
    for func, pk in lost:
        if func == "model_download_task":
            enqueue_download(pk)
        elif func == "extraction_export_task":
            enqueue(EXPORT_TASK, pk, cluster=cluster)
        else:
            enqueue_gpu(func, pk)
    if cluster == settings.DOWNLOAD_CLUSTER:
        lost += datasets_requeue(waiting)
    if lost:
        log.warning("queued %d job(s) again whose task was lost with a worker", len(lost))
    return len(lost)


def _reconcile_later() -> None:
    try:
        reconcile_all()
    except Exception:  # noqa: BLE001 - the periodic schedule tries again
        log.warning("reconciler failed", exc_info=True)
    finally:
        connections.close_all()  # this thread's connections


def worker_start(cluster: str) -> None:
    """A worker of `cluster` started, maybe in place of one that died: end stale jobs, queue lost
    ones again, and look again once every heartbeat from before this start has gone stale (so a
    restart ends the dead worker's jobs within STALE_HEARTBEAT_SECONDS, not at the next minute)."""
    reconcile_all()
    jobs_requeue(cluster)
    later = threading.Timer(settings.STALE_HEARTBEAT_SECONDS + 1, _reconcile_later)
    later.daemon = True
    later.start()
