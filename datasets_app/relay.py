"""What the embedded-mode relay watches for the Datasets panel: dataset rows."""

from __future__ import annotations

from datetime import datetime

from mistudio.realtime import RelaySource

from .models import Dataset


def dataset_changes(since: datetime) -> list[tuple[str, str, datetime]]:
    rows = Dataset.objects.filter(updated_at__gte=since).values_list("id", "updated_at")
    return [(pk, pk, ts) for pk, ts in rows]


DATASETS_SOURCE = RelaySource(Dataset.live_group, "card.changed", dataset_changes)
