"""Websocket: pushes the model-card partial whenever a model (or its extraction) changes, and the
header's device badge whenever the set of loaded models changes (so "loaded: …" in the header
never lags the cards)."""

from __future__ import annotations

from datetime import timedelta

from channels.db import database_sync_to_async
from django.template.loader import render_to_string
from django.utils import timezone

from mistudio.errors import NotFound
from mistudio.realtime import CardConsumer

from .models import ExtractionJob, Model
from .selectors import device_summary, model_card_get, pushes_latest


def card_html(model_id: str) -> str | None:
    """The card partial as the page renders it, the extraction modal's box of the model's newest
    extraction, the Extractions page's rows of its running and newest extractions (and those
    whose SAELens export is moving), the state of its extractions' latest pushes, all marked
    for an out-of-band swap (a page applies what it shows); None if the model is gone."""
    try:
        model = model_card_get(model_id)
    except NotFound:
        return None
    html = render_to_string("models_app/models.html#model_card", {"model": model, "oob": True})
    for job in model.latest_extractions:
        context = {"job": job, "oob": True}
        html += render_to_string("models_app/extract.html#extraction_box", context)
    jobs = {job.pk: job for job in [*model.active_extractions, *model.latest_extractions]}
    for job in _exporting(model_id):  # an older extraction's SAELens export moving
        jobs.setdefault(job.pk, job)
    for job in jobs.values():  # the rows of the model's Extractions page
        context = {"job": job, "oob": True}
        html += render_to_string("models_app/extractions.html#extraction_row", context)
    for push in pushes_latest(model_id):  # the push states under completed extractions
        html += render_to_string(
            "models_app/push.html#push_status",
            {"push": push, "xid": push.extraction_id, "oob": True},
        )
    return html


EXPORT_RECENT = timedelta(seconds=30)


def _exporting(model_id: str) -> list[ExtractionJob]:
    """The model's extractions whose export is running or changed in the last seconds (its end
    included, whatever the extraction's age)."""
    since = timezone.now() - EXPORT_RECENT
    rows = ExtractionJob.objects.filter(model_id=model_id, export__updated_at__gte=since)
    return list(rows.select_related("export"))


def loaded_models() -> list[tuple[str, str]]:
    """(id, quantization) of the models loaded now, as the header lists them."""
    return list(Model.objects.filter(is_loaded=True).values_list("pk", "quantization"))


def badge_html() -> str:
    """The header's device badge, marked to replace the badge's content out of band."""
    badge = render_to_string("shell.html#device_badge", {"device": device_summary()})
    return f'<span id="device-badge" hx-swap-oob="innerHTML">{badge}</span>'


class ModelsConsumer(CardConsumer):
    group = Model.live_group
    prefix = "model"
    card_html = staticmethod(card_html)
    rows = Model
    loaded: list | None = None

    async def connect(self) -> None:
        self.loaded = await database_sync_to_async(loaded_models)()
        await super().connect()

    async def card_pushed(self, pk: str) -> None:
        await self._badge_if_loaded_changed()

    async def card_deleted(self, event: dict) -> None:
        await super().card_deleted(event)
        await self._badge_if_loaded_changed()

    async def _badge_if_loaded_changed(self) -> None:
        loaded = await database_sync_to_async(loaded_models)()
        if loaded != self.loaded:
            await self.send(text_data=await database_sync_to_async(badge_html)())
        self.loaded = loaded
