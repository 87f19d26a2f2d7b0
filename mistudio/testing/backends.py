"""Which database, task broker and channel layer this process really uses, so a test phase that
claims PostgreSQL + Redis cannot silently run on SQLite and the in-process layer."""

from __future__ import annotations

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.conf import settings
from django.db import connection
from django_q.brokers import get_broker

EXPECTED = {
    "sqlite": {"database": "sqlite", "broker": "ORM", "channels": "InMemoryChannelLayer"},
    "postgres": {"database": "postgresql", "broker": "Redis", "channels": "RedisChannelLayer"},
}


def backends_in_use() -> dict[str, str]:
    """{database, broker, channels}: the DB vendor, django-q2's broker class name and the
    channel layer's class name."""
    return {
        "database": connection.vendor,
        "broker": type(get_broker(settings.DOWNLOAD_CLUSTER)).__name__,
        "channels": type(get_channel_layer()).__name__,
    }


def _round_trip() -> None:
    """Raise unless the broker and the channel layer answer (a message goes through the layer)."""
    connection.ensure_connection()
    if not get_broker(settings.DOWNLOAD_CLUSTER).ping():
        raise RuntimeError("the task broker does not answer")
    layer = get_channel_layer()
    channel = async_to_sync(layer.new_channel)()
    async_to_sync(layer.send)(channel, {"type": "backend.check"})
    if async_to_sync(layer.receive)(channel) != {"type": "backend.check"}:
        raise RuntimeError("the channel layer lost a message")


def backend_problems(expected: str) -> list[str]:
    """What differs from the `expected` phase ("sqlite" or "postgres"); empty when all holds."""
    want = EXPECTED[expected]
    got = backends_in_use()
    problems = [f"{k}: {got[k]} instead of {v}" for k, v in want.items() if got[k] != v]
    try:
        _round_trip()
    except Exception as exc:  # noqa: BLE001 - reported, not raised: the phase stops on it
        problems.append(f"round trip failed: {type(exc).__name__}: {exc}")
    return problems
