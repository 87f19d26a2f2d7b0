"""The progress websocket: card partials pushed on change, same-origin only, the embedded relay."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta

import pytest
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from channels.testing import WebsocketCommunicator
from django.utils import timezone

from mistudio.asgi import application
from mistudio.realtime import Relay
from models_app.models import Model, ModelStatus
from models_app.relay import MODELS_SOURCE

pytestmark = [pytest.mark.django_db(transaction=True)]
ORIGIN = [(b"origin", b"http://127.0.0.1:8000"), (b"host", b"127.0.0.1:8000")]


def make_row(**fields) -> Model:
    return Model.objects.create(name="m", hf_repo_id="o/m", quantization="Q4", **fields)


async def connect(headers=ORIGIN):
    comm = WebsocketCommunicator(application, "/ws/models/", headers=headers)
    connected, _ = await comm.connect()
    return comm, connected


@pytest.mark.asyncio
async def test_a_change_pushes_the_card_partial():
    row = await database_sync_to_async(make_row)(status=ModelStatus.DOWNLOADING, progress=12.5)
    comm, connected = await connect()
    assert connected
    await database_sync_to_async(Model.announce)(row.pk)
    html = await comm.receive_from(timeout=60)
    assert f'id="model-{row.pk}"' in html and 'hx-swap-oob="true"' in html and "12.5%" in html
    await comm.disconnect()


@pytest.mark.asyncio
async def test_loading_or_unloading_a_model_pushes_the_header_badge_at_once():
    row = await database_sync_to_async(make_row)(status=ModelStatus.READY)
    comm, _ = await connect()

    def loaded(value: bool) -> None:  # what the GPU worker writes, then announces
        Model.touch(row.pk, is_loaded=value)

    await database_sync_to_async(loaded)(True)
    assert f'id="model-{row.pk}"' in await comm.receive_from(timeout=60)
    badge = await comm.receive_from(timeout=60)
    assert 'id="device-badge" hx-swap-oob="innerHTML"' in badge and "loaded: m [Q4]" in badge
    await database_sync_to_async(loaded)(False)
    await comm.receive_from(timeout=60)  # the card
    assert "loaded:" not in await comm.receive_from(timeout=60)
    await database_sync_to_async(Model.touch)(row.pk, progress=100.0)  # no change of loaded
    later = []
    while not await comm.receive_nothing(timeout=1):  # the card (and the relay's copy of it)
        later.append(await comm.receive_from(timeout=60))
    assert later and not [m for m in later if "device-badge" in m]
    await comm.disconnect()


@pytest.mark.asyncio
async def test_a_deleted_model_removes_its_card():
    comm, _ = await connect()
    await database_sync_to_async(Model.announce)("m_gone", "card.deleted")
    assert 'hx-swap-oob="delete"' in await comm.receive_from(timeout=60)
    await comm.disconnect()


@pytest.mark.asyncio
async def test_a_foreign_origin_is_refused():
    _, connected = await connect([(b"origin", b"http://evil.example")])
    assert not connected


@pytest.mark.asyncio
async def test_the_relay_announces_rows_other_processes_changed():
    row = await database_sync_to_async(make_row)(status=ModelStatus.DOWNLOADING)
    relay = Relay([MODELS_SOURCE])
    await relay.poll_once()
    comm, _ = await connect()

    def worker_writes():  # what a worker process does: a plain UPDATE, no channel message
        Model.objects.filter(pk=row.pk).update(progress=55.0, updated_at=timezone.now())

    await database_sync_to_async(worker_writes)()
    assert await relay.poll_once() == [row.pk]
    assert "55.0%" in await comm.receive_from(timeout=60)
    assert await relay.poll_once() == []  # nothing new, nothing sent
    await comm.disconnect()


def _aged(row: Model, seconds: float) -> None:
    """Make `row` look last written `seconds` ago (older than the relay's overlap window)."""
    Model.objects.filter(pk=row.pk).update(updated_at=timezone.now() - timedelta(seconds=seconds))


async def _everything(comm) -> list[str]:
    got = []
    while not await comm.receive_nothing(timeout=2):
        got.append(await comm.receive_from(timeout=60))
    return got


@pytest.mark.asyncio
async def test_a_page_that_reconnects_gets_what_changed_while_it_was_away():
    rows = [Model(name="m", hf_repo_id=f"o/m{i}", quantization="Q4") for i in range(3)]
    away, shown, old = await database_sync_to_async(Model.objects.bulk_create)(rows)
    await database_sync_to_async(_aged)(away, 20)  # written during the page's 10 s gap (+ margin)
    await database_sync_to_async(_aged)(shown, 3600)  # shown, unchanged: not rendered again
    await database_sync_to_async(_aged)(old, 3600)  # neither shown nor changed: not pushed
    comm, _ = await connect()
    resync = {"resync": {"gap_s": 10, "ids": [shown.pk, "m_gone"]}}
    await comm.send_to(text_data=json.dumps(resync))
    got = await _everything(comm)
    assert any(f'id="model-{away.pk}"' in m and 'hx-swap-oob="true"' in m for m in got)
    assert '<div id="model-m_gone" hx-swap-oob="delete"></div>' in got  # deleted meanwhile
    assert not any(old.pk in m or shown.pk in m for m in got)
    assert len(got) == 2
    await comm.send_to(text_data=json.dumps(resync))  # once per connection
    assert await comm.receive_nothing(timeout=2)
    await comm.disconnect()


JUNK = [
    " ", "null", "[]", "{}", '{"resync": 1}', '{"resync": {"gap_s": "x", "ids": []}}',
    '{"resync": {"gap_s": 1e999, "ids": []}}', '{"resync": {"gap_s": NaN, "ids": []}}',
    '{"resync": {"gap_s": 1, "ids": "m_1"}}', '{"resync": {"gap_s": 1, "ids": [1]}}',
    '{"resync": {"gap_s": 1, "ids": ["<script>"]}}',
    json.dumps({"resync": {"gap_s": 1, "ids": ["a" * 65]}}),
    json.dumps({"resync": {"gap_s": 1, "ids": [f"m_{i}" for i in range(1001)]}}),
    "[" * 60_000, "[" * 100_000, '{"resync": {"gap_s": 1, "ids": []}' + " " * 70_000 + "}",
]  # fmt: skip


@pytest.mark.asyncio
async def test_anything_else_a_page_sends_is_ignored():
    row = await database_sync_to_async(make_row)()
    await database_sync_to_async(_aged)(row, 3600)
    comm, _ = await connect()
    for text in JUNK:
        await comm.send_to(text_data=text)
    await comm.send_to(bytes_data=b"\x00\xff")
    assert await comm.receive_nothing(timeout=2)  # no answer, and the socket stays open
    await comm.send_to(text_data=json.dumps({"resync": {"gap_s": 0, "ids": [row.pk, "m_x"]}}))
    assert await comm.receive_from(timeout=60) == '<div id="model-m_x" hx-swap-oob="delete"></div>'
    assert await comm.receive_nothing(timeout=2)
    await comm.disconnect()


@pytest.mark.asyncio
async def test_a_page_idle_longer_than_the_layers_blocking_read_still_gets_the_next_change():
    """channels_redis waits for messages with a blocking read of `brpop_timeout` seconds; a
    socket timeout shorter than that (redis-py 8's default) killed every idle consumer."""
    row = await database_sync_to_async(make_row)(status=ModelStatus.DOWNLOADING)
    await database_sync_to_async(_aged)(row, 3600)  # the embedded relay does not announce it
    comm, _ = await connect()
    layer = get_channel_layer()
    await asyncio.sleep(getattr(layer, "brpop_timeout", 5) + 3)
    await database_sync_to_async(Model.touch)(row.pk, progress=42.0)
    assert "42.0%" in await comm.receive_from(timeout=60)
    await comm.disconnect()
