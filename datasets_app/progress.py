"""Dataset job progress: throttled DB writes (the truth) plus a channel hint for live pages."""

from __future__ import annotations

from django.utils import timezone

from mistudio.realtime import group_notify

from .models import Dataset

DATASETS_GROUP = "datasets"


def notify(event: str, dataset_id: str) -> None:
    """Tell connected pages a dataset card changed (`card.changed`) or went (`card.deleted`)."""
    group_notify(DATASETS_GROUP, event, dataset_id)


def row_update(dataset_id: str, **fields) -> int:
    """UPDATE one dataset row with `fields` plus updated_at/heartbeat_at; send the change hint.
    Returns the number of rows updated (0 when the row is gone)."""
    now = timezone.now()
    n = Dataset.objects.filter(pk=dataset_id).update(updated_at=now, heartbeat_at=now, **fields)
    if n:
        notify("card.changed", dataset_id)
    return n
