"""The datasets websocket: card partials pushed on change, same-origin only, the embedded relay."""

from __future__ import annotations

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.utils import timezone

from datasets_app.models import Dataset, DatasetStatus
from datasets_app.relay import DATASETS_SOURCE
from mistudio.asgi import application
from mistudio.realtime import Relay

pytestmark = [pytest.mark.django_db(transaction=True)]
ORIGIN = [(b"origin", b"http://127.0.0.1:8000"), (b"host", b"127.0.0.1:8000")]


def make_row(**fields) -> Dataset:
    return Dataset.objects.create(name="d", source="hub", hf_dataset_id="o/d", **fields)


async def connect(headers=ORIGIN):
    comm = WebsocketCommunicator(application, "/ws/datasets/", headers=headers)
    connected, _ = await comm.connect()
    return comm, connected


@pytest.mark.asyncio
async def test_a_progress_write_pushes_the_card_partial():
    row = await database_sync_to_async(make_row)(status=DatasetStatus.IMPORTING)
    comm, connected = await connect()
    assert connected
    await database_sync_to_async(Dataset.touch)(row.pk, progress=12.5, phase="downloading")
    html = await comm.receive_from(timeout=60)
    assert f'id="dataset-{row.pk}"' in html and 'hx-swap-oob="true"' in html and "12.5%" in html
    await comm.disconnect()


@pytest.mark.asyncio
async def test_a_deleted_dataset_removes_its_card():
    comm, _ = await connect()
    await database_sync_to_async(Dataset.announce)("d_gone", "card.deleted")
    assert 'id="dataset-d_gone" hx-swap-oob="delete"' in await comm.receive_from(timeout=60)
    await comm.disconnect()


@pytest.mark.asyncio
async def test_a_foreign_origin_is_refused():
    _, connected = await connect([(b"origin", b"http://evil.example")])
    assert not connected


@pytest.mark.asyncio
async def test_the_relay_announces_rows_other_processes_changed():
    row = await database_sync_to_async(make_row)(status=DatasetStatus.IMPORTING)
    relay = Relay([DATASETS_SOURCE])
    await relay.poll_once()
    comm, _ = await connect()

    def worker_writes():  # what a worker process does: a plain UPDATE, no channel message
        Dataset.objects.filter(pk=row.pk).update(progress=55.0, updated_at=timezone.now())

    await database_sync_to_async(worker_writes)()
    assert await relay.poll_once() == [row.pk]
    assert "55.0%" in await comm.receive_from(timeout=60)
    assert await relay.poll_once() == []
    await comm.disconnect()
