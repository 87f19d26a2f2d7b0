"""Websocket: pushes the model-card partial whenever a model row changes."""

from __future__ import annotations

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.template.loader import render_to_string

from mistudio.errors import NotFound

from .services import model_card_get
from .progress import MODELS_GROUP
from .relay import relay_ensure_running


def card_html(model_id: str) -> str | None:
    """The card partial as the page renders it, marked for an out-of-band swap; None if gone."""
    try:
        model = model_card_get(model_id)
    except NotFound:
        return None
    return render_to_string("models_app/models.html#model_card", {"model": model, "oob": True})


class ModelsConsumer(AsyncWebsocketConsumer):
    async def connect(self) -> None:
        await self.channel_layer.group_add(MODELS_GROUP, self.channel_name)
        relay_ensure_running()
        await self.accept()

    async def disconnect(self, code) -> None:
        await self.channel_layer.group_discard(MODELS_GROUP, self.channel_name)

    async def receive(self, text_data=None, bytes_data=None) -> None:
        """Clients only listen; anything they send is ignored."""

    async def model_changed(self, event: dict) -> None:
        html = await database_sync_to_async(card_html)(event["id"])
        if html is not None:
            await self.send(text_data=html)

    async def model_deleted(self, event: dict) -> None:
        await self.send(text_data=f'<div id="model-{event["id"]}" hx-swap-oob="delete"></div>')
