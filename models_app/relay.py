"""Embedded-mode relay: worker processes cannot reach the in-process channel layer, so the web
process polls the job rows and turns each change into a group message.

With REDIS_URL set the workers publish directly and no relay runs.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timedelta

from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from django.conf import settings
from django.utils import timezone

from .models import ExtractionJob, Model
from .progress import MODELS_GROUP

log = logging.getLogger(__name__)

# Rows written by other processes can commit slightly out of timestamp order: re-read a window.
OVERLAP = timedelta(seconds=2)
_task: asyncio.Task | None = None


def _changes(since: datetime) -> list[tuple[str, str, datetime]]:
    """(row key, model id to announce, updated_at) of model and extraction rows written lately."""
    window = since - OVERLAP
    models = Model.objects.filter(updated_at__gte=window).values_list("id", "updated_at")
    jobs = ExtractionJob.objects.filter(updated_at__gte=window).values_list(
        "id", "model_id", "updated_at"
    )
    return [(pk, pk, ts) for pk, ts in models] + [(pk, mid, ts) for pk, mid, ts in jobs]


class Relay:
    """Remembers what it has announced; each poll announces rows whose updated_at moved."""

    def __init__(self) -> None:
        self.seen: dict[str, datetime] = {}
        self.since = timezone.now()

    async def poll_once(self) -> list[str]:
        rows = await database_sync_to_async(_changes)(self.since)
        changed = sorted({mid for key, mid, ts in rows if self.seen.get(key) != ts})
        for key, _, ts in rows:
            self.seen[key] = ts
            self.since = max(self.since, ts)
        layer = get_channel_layer()
        for pk in changed:
            await layer.group_send(MODELS_GROUP, {"type": "model.changed", "id": pk})
        cutoff = self.since - OVERLAP
        self.seen = {pk: ts for pk, ts in self.seen.items() if ts >= cutoff}
        return changed

    async def run(self, interval: float) -> None:
        while True:
            try:
                await self.poll_once()
            except Exception:  # noqa: BLE001 - keep relaying after a transient DB error
                log.warning("progress relay poll failed", exc_info=True)
            await asyncio.sleep(interval)


def relay_ensure_running() -> None:
    """Start the relay in this event loop once (embedded mode only)."""
    global _task
    if not settings.PROGRESS_RELAY:
        return
    if _task is not None and not _task.done():
        return
    _task = asyncio.get_running_loop().create_task(Relay().run(settings.PROGRESS_RELAY_INTERVAL))
