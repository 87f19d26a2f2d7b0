"""The progress websocket: card partials pushed on change, same-origin only, the embedded relay."""

from __future__ import annotations

import pytest
from channels.db import database_sync_to_async
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
