"""Read what is waiting in the django-q2 queues, decoded, whichever broker is configured (ORM or
Redis): tests use it to prove task payloads hold ids only, never secrets."""

from __future__ import annotations

from django.conf import settings
from django_q.brokers import get_broker
from django_q.models import OrmQ, Task
from django_q.signing import SignedPackage

CLUSTERS = (settings.DOWNLOAD_CLUSTER, settings.GPU_CLUSTER)


def _redis_payloads(cluster: str) -> list[dict]:
    broker = get_broker(cluster)
    return [SignedPackage.loads(raw) for raw in broker.connection.lrange(broker.list_key, 0, -1)]


def queues_purge() -> None:
    """Empty every cluster's queue, whichever broker is configured."""
    for cluster in CLUSTERS:
        get_broker(cluster).purge_queue()


def queued_task_payloads() -> list[dict]:
    """Every queued task as django-q2 will run it (func, args, kwargs…), decoded."""
    if settings.Q_CLUSTER.get("redis"):
        return [p for cluster in CLUSTERS for p in _redis_payloads(cluster)]
    return [q.task for q in OrmQ.objects.all()]


def stored_task_records() -> list[dict]:
    """Finished tasks as django-q2 keeps them (args, kwargs and results decoded by the ORM)."""
    return list(Task.objects.values("name", "func", "args", "kwargs", "result"))
