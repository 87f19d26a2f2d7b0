"""Embedded-mode relay for dataset rows: worker processes cannot reach the in-process channel
layer, so the web process polls the rows and turns each change into a group message.

Same design as `models_app.relay`; with REDIS_URL set the workers publish directly (no relay).
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timedelta

from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from django.conf import settings
from django.utils import timezone

from .models import Dataset
from .progress import DATASETS_GROUP

log = logging.getLogger(__name__)

# Rows written by other processes can commit slightly out of timestamp order: re-read a window.
OVERLAP = timedelta(seconds=2)
_task: asyncio.Task | None = None


def _changes(since: datetime) -> list[tuple[str, datetime]]:
    rows = Dataset.objects.filter(updated_at__gte=since - OVERLAP)
    return list(rows.values_list("id", "updated_at"))


class Relay:
    """Remembers what it has announced; each poll announces rows whose updated_at moved."""

    def __init__(self) -> None:
        self.seen: dict[str, datetime] = {}
        self.since = timezone.now()

    async def poll_once(self) -> list[str]:
        """Announce changed rows; return their ids."""
        rows = await database_sync_to_async(_changes)(self.since)
        changed = [pk for pk, ts in rows if self.seen.get(pk) != ts]
        for pk, ts in rows:
            self.seen[pk] = ts
            self.since = max(self.since, ts)
        layer = get_channel_layer()
        for pk in changed:
            await layer.group_send(DATASETS_GROUP, {"type": "dataset.changed", "id": pk})
        cutoff = self.since - OVERLAP
        self.seen = {pk: ts for pk, ts in self.seen.items() if ts >= cutoff}
        return changed

    async def run(self, interval: float) -> None:
        while True:
            try:
                await self.poll_once()
            except Exception:  # noqa: BLE001 - keep relaying after a transient DB error
                log.warning("dataset progress relay poll failed", exc_info=True)
            await asyncio.sleep(interval)


def relay_ensure_running() -> None:
    """Start the relay in this event loop once (embedded mode only)."""
    global _task
    if not settings.PROGRESS_RELAY:
        return
    if _task is not None and not _task.done():
        return
    _task = asyncio.get_running_loop().create_task(Relay().run(settings.PROGRESS_RELAY_INTERVAL))
