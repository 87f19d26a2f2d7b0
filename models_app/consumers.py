"""Websocket: pushes the model-card partial whenever a model (or its extraction) changes."""

from __future__ import annotations

from django.template.loader import render_to_string

from mistudio.errors import NotFound
from mistudio.realtime import CardConsumer

from .models import Model
from .selectors import model_card_get


def card_html(model_id: str) -> str | None:
    """The card partial as the page renders it, marked for an out-of-band swap; None if gone."""
    try:
        model = model_card_get(model_id)
    except NotFound:
        return None
    return render_to_string("models_app/models.html#model_card", {"model": model, "oob": True})


class ModelsConsumer(CardConsumer):
    group = Model.live_group
    prefix = "model"
    card_html = staticmethod(card_html)
