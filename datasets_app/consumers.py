"""Websocket: pushes the dataset-card partial whenever a dataset row changes."""

from __future__ import annotations

from django.template.loader import render_to_string

from mistudio.realtime import CardConsumer

from .models import Dataset


def card_html(dataset_id: str) -> str | None:
    """The card partial as the page renders it, marked for an out-of-band swap; None if gone."""
    dataset = Dataset.objects.filter(pk=dataset_id).first()
    if dataset is None:
        return None
    context = {"dataset": dataset, "oob": True}
    return render_to_string("datasets_app/datasets.html#dataset_card", context)


class DatasetsConsumer(CardConsumer):
    group = Dataset.live_group
    prefix = "dataset"
    card_html = staticmethod(card_html)
    rows = Dataset
