"""Live page updates: channel-layer hints, the embedded-mode relay, and the card consumer.

The DB row is the truth; these only tell connected pages to re-render a card. Worker processes
cannot reach the in-process channel layer of the embedded setup, so a relay inside the web process
polls the job tables and turns changes into group messages. With REDIS_URL the workers publish
directly and no relay runs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
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
# A resync also covers the seconds before the page saw its socket close: a consumer that died
# (or a page still loading) missed what was sent while its end was already gone.
RESYNC_MARGIN = timedelta(seconds=30)
RESYNC_MAX_GAP_S = 7 * 24 * 3600
RESYNC_MAX_IDS = 1000
RESYNC_MAX_BYTES = 64 * 1024
_CARD_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


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


def resync_request(text: str | None) -> tuple[float, list[str]] | None:
    """(gap in seconds, card ids) of a page's resync message, or None for anything else.

    The message, sent by static/js/live.js once per connection: {"resync": {"gap_s": seconds
    since the page last heard the server (or since it was requested), "ids": [ids of the cards
    it shows]}}. Bounded: at most RESYNC_MAX_BYTES, RESYNC_MAX_IDS ids of <= 64 safe
    characters, a gap clamped to RESYNC_MAX_GAP_S; anything malformed is ignored, never an
    error."""
    if not text or len(text) > RESYNC_MAX_BYTES:
        return None
    try:
        body = json.loads(text)["resync"]
        gap, ids = float(body["gap_s"]), body["ids"]
    except (ValueError, TypeError, KeyError, IndexError, RecursionError):
        return None
    if not math.isfinite(gap) or not isinstance(ids, list) or len(ids) > RESYNC_MAX_IDS:
        return None
    if not all(isinstance(pk, str) and _CARD_ID.fullmatch(pk) for pk in ids):
        return None
    return min(max(gap, 0.0), RESYNC_MAX_GAP_S), list(dict.fromkeys(ids))


def changed_since(group: str, since: datetime) -> list[str]:
    """The ids the relay sources of `group` would announce for rows written since `since`."""
    ids = [pk for src in SOURCES if src.group == group for _, pk, _ in src.changes(since)]
    return list(dict.fromkeys(ids))


class CardConsumer(AsyncWebsocketConsumer):
    """Pushes a card partial (marked for an out-of-band swap) for each `<kind>.changed` message
    of `group`, and a delete swap for `<kind>.deleted`. Subclasses set group, prefix, card_html.

    What is sent while a page has no socket (it is loading, or the connection dropped) is lost;
    so once per connection the page asks for a resync (see resync_request): the cards of every
    row changed since it last heard the server, and a delete swap for each card it shows whose
    row is gone (one query; the cards that did not change are not rendered again).

    Changes are coalesced per card: the handler returns at once and one task renders the row as
    it is now, once more if it changed meanwhile. A busy page thus never lets the channel
    layer's queue fill (channels_redis drops what is over its capacity, the last change among
    it), and never gets a stale card after a newer one."""

    group = ""
    prefix = ""
    rows = None  # the Django model of the cards' rows (a subclass sets it)

    @staticmethod
    def card_html(pk: str) -> str | None:
        raise NotImplementedError

    async def connect(self) -> None:
        self.dirty: dict[str, bool] = {}  # card id -> changed since its push task last read it
        self.pushes: set[asyncio.Task] = set()
        self.resynced = False
        await self.channel_layer.group_add(self.group, self.channel_name)
        relay_ensure_running()
        await self.accept()

    async def disconnect(self, code) -> None:
        for task in list(getattr(self, "pushes", ())):
            task.cancel()
        await self.channel_layer.group_discard(self.group, self.channel_name)

    async def receive(self, text_data=None, bytes_data=None) -> None:
        """Clients listen; they send one resync request per connection, and anything else they
        send (or a second request) is ignored."""
        request = None if self.resynced else resync_request(text_data)
        if request is None:
            return
        self.resynced = True
        gap_s, shown = request
        since = timezone.now() - timedelta(seconds=gap_s) - RESYNC_MARGIN
        changed = await database_sync_to_async(changed_since)(self.group, since)
        for pk in changed:
            await self.card_changed({"id": pk})
        for pk in await database_sync_to_async(self._gone)(shown):
            await self.send(text_data=self._delete_html(pk))

    def _gone(self, ids: list[str]) -> list[str]:
        """The ids among `ids` that have no row any more."""
        present = set(self.rows.objects.filter(pk__in=ids).values_list("pk", flat=True))
        return [pk for pk in ids if pk not in present]

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
                await self.send(text_data=self._delete_html(pk) if html is None else html)
                await self.card_pushed(pk)
        finally:
            self.dirty.pop(pk, None)

    async def card_pushed(self, pk: str) -> None:
        """Called after each push of card `pk` (subclasses push what depends on it)."""

    async def card_deleted(self, event: dict) -> None:
        await self.send(text_data=self._delete_html(event["id"]))

    def _delete_html(self, pk: str) -> str:
        """The swap that removes card `pk` (a page without it skips it: see live.js)."""
        return f'<div id="{self.prefix}-{pk}" hx-swap-oob="delete"></div>'
