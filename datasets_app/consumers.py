"""Websocket: pushes the dataset-card partial whenever a dataset row changes."""

from __future__ import annotations

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.template.loader import render_to_string

from .models import Dataset
from .progress import DATASETS_GROUP
from .relay import relay_ensure_running


def card_html(dataset_id: str) -> str | None:
    """The card partial as the page renders it, marked for an out-of-band swap; None if gone."""
    dataset = Dataset.objects.filter(pk=dataset_id).first()
    if dataset is None:
        return None
    context = {"dataset": dataset, "oob": True}
    return render_to_string("datasets_app/datasets.html#dataset_card", context)


class DatasetsConsumer(AsyncWebsocketConsumer):
    async def connect(self) -> None:
        await self.channel_layer.group_add(DATASETS_GROUP, self.channel_name)
        relay_ensure_running()
        await self.accept()

    async def disconnect(self, code) -> None:
        await self.channel_layer.group_discard(DATASETS_GROUP, self.channel_name)

    async def receive(self, text_data=None, bytes_data=None) -> None:
        """Clients only listen; anything they send is ignored."""

    async def dataset_changed(self, event: dict) -> None:
        html = await database_sync_to_async(card_html)(event["id"])
        if html is not None:
            await self.send(text_data=html)

    async def dataset_deleted(self, event: dict) -> None:
        await self.send(text_data=f'<div id="dataset-{event["id"]}" hx-swap-oob="delete"></div>')
