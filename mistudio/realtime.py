"""Live page updates: channel-layer hints, the embedded-mode relay, and the card consumer.

The DB row is the truth; these only tell connected pages to re-render a card. Worker processes
cannot reach the in-process channel layer of the embedded setup, so a relay inside the web process
polls the job tables and turns changes into group messages. With REDIS_URL the workers publish
directly and no relay runs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from asgiref.sync import async_to_sync
from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from channels.layers import get_channel_layer
from django.conf import settings
from django.utils import timezone

log = logging.getLogger(__name__)

# Rows written by other processes can commit slightly out of timestamp order: re-read a window.
OVERLAP = timedelta(seconds=2)


def _in_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def group_notify(group: str, event: str, pk: str) -> None:
    """Send {type: event, id: pk} to `group`. Best effort: a lost hint never fails a job (and from
    inside an event loop, where a blocking send is impossible, the relay covers it)."""
    layer = get_channel_layer()
    if layer is None or _in_event_loop():
        return
    try:
        async_to_sync(layer.group_send)(group, {"type": event, "id": pk})
    except Exception:  # noqa: BLE001
        log.warning("could not send %s for %s", event, pk, exc_info=True)


@dataclass(frozen=True)
class RelaySource:
    """A table to watch: `changes(since)` returns (row key, id to announce, updated_at)."""

    group: str
    event: str
    changes: Callable[[datetime], list[tuple[str, str, datetime]]]


SOURCES: list[RelaySource] = []


def relay_source_register(source: RelaySource) -> None:
    if source not in SOURCES:
        SOURCES.append(source)


class Relay:
    """Remembers what it announced; each poll announces rows whose updated_at moved."""

    def __init__(self, sources: list[RelaySource] | None = None) -> None:
        self.sources = sources if sources is not None else SOURCES
        self.seen: dict[tuple[str, str], datetime] = {}
        self.since = timezone.now()

    def _poll(self) -> list[tuple[RelaySource, str]]:
        window = self.since - OVERLAP
        announce: list[tuple[RelaySource, str]] = []
        for source in self.sources:
            for key, pk, ts in source.changes(window):
                if self.seen.get((source.group, key)) != ts and (source, pk) not in announce:
                    announce.append((source, pk))
                self.seen[(source.group, key)] = ts
                self.since = max(self.since, ts)
        cutoff = self.since - OVERLAP
        self.seen = {k: ts for k, ts in self.seen.items() if ts >= cutoff}
        return announce

    async def poll_once(self) -> list[str]:
        """Announce changed rows; return the announced ids."""
        announce = await database_sync_to_async(self._poll)()
        layer = get_channel_layer()
        for source, pk in announce:
            await layer.group_send(source.group, {"type": source.event, "id": pk})
        return [pk for _, pk in announce]

    async def run(self, interval: float) -> None:
        while True:
            try:
                await self.poll_once()
            except Exception:  # noqa: BLE001 - keep relaying after a transient DB error
                log.warning("progress relay poll failed", exc_info=True)
            await asyncio.sleep(interval)


_task: asyncio.Task | None = None


def relay_ensure_running() -> None:
    """Start the relay in this event loop once (embedded mode only)."""
    global _task
    if not settings.PROGRESS_RELAY or (_task is not None and not _task.done()):
        return
    _task = asyncio.get_running_loop().create_task(Relay().run(settings.PROGRESS_RELAY_INTERVAL))


class CardConsumer(AsyncWebsocketConsumer):
    """Pushes a card partial (marked for an out-of-band swap) for each `<kind>.changed` message
    of `group`, and a delete swap for `<kind>.deleted`. Subclasses set group, prefix, card_html.

    Changes are coalesced per card: the handler returns at once and one task renders the row as
    it is now, once more if it changed meanwhile. A busy page thus never lets the channel
    layer's queue fill (channels_redis drops what is over its capacity, the last change among
    it), and never gets a stale card after a newer one."""

    group = ""
    prefix = ""

    @staticmethod
    def card_html(pk: str) -> str | None:
        raise NotImplementedError

    async def connect(self) -> None:
        self.dirty: dict[str, bool] = {}  # card id -> changed since its push task last read it
        self.pushes: set[asyncio.Task] = set()
        await self.channel_layer.group_add(self.group, self.channel_name)
        relay_ensure_running()
        await self.accept()

    async def disconnect(self, code) -> None:
        for task in list(getattr(self, "pushes", ())):
            task.cancel()
        await self.channel_layer.group_discard(self.group, self.channel_name)

    async def receive(self, text_data=None, bytes_data=None) -> None:
        """Clients only listen; anything they send is ignored."""

    async def card_changed(self, event: dict) -> None:
        pk = event["id"]
        running = pk in self.dirty
        self.dirty[pk] = True
        if not running:
            task = asyncio.get_running_loop().create_task(self._push_latest(pk))
            self.pushes.add(task)
            task.add_done_callback(self.pushes.discard)

    async def _push_latest(self, pk: str) -> None:
        try:
            while self.dirty.get(pk):
                self.dirty[pk] = False
                html = await database_sync_to_async(type(self).card_html)(pk)
                if html is not None:
                    await self.send(text_data=html)
                await self.card_pushed(pk)
        finally:
            self.dirty.pop(pk, None)

    async def card_pushed(self, pk: str) -> None:
        """Called after each push of card `pk` (subclasses push what depends on it)."""

    async def card_deleted(self, event: dict) -> None:
        await self.send(
            text_data=f'<div id="{self.prefix}-{event["id"]}" hx-swap-oob="delete"></div>'
        )
