"""Dataset job progress: throttled DB writes (the truth) plus a channel hint for live pages."""

from __future__ import annotations

import logging

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.utils import timezone

from .models import Dataset

log = logging.getLogger(__name__)

DATASETS_GROUP = "datasets"


def notify(event: str, dataset_id: str) -> None:
    """Tell connected pages that a dataset row changed (`dataset.changed`) or went away
    (`dataset.deleted`). Best effort: the row stays the truth; the relay finds worker changes."""
    layer = get_channel_layer()
    if layer is None:
        return
    try:
        async_to_sync(layer.group_send)(DATASETS_GROUP, {"type": event, "id": dataset_id})
    except Exception:  # noqa: BLE001 - a lost hint must never fail a job
        log.warning("could not send %s for %s", event, dataset_id, exc_info=True)


def row_update(dataset_id: str, **fields) -> int:
    """UPDATE one dataset row with `fields` plus updated_at/heartbeat_at; send the change hint.
    Returns the number of rows updated (0 when the row is gone)."""
    now = timezone.now()
    n = Dataset.objects.filter(pk=dataset_id).update(updated_at=now, heartbeat_at=now, **fields)
    if n:
        notify("dataset.changed", dataset_id)
    return n
