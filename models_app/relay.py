"""What the embedded-mode relay watches for the Models panel: model rows, extraction rows and
their SAELens exports (an extraction's and an export's progress are shown on the model's card)."""

from __future__ import annotations

from datetime import datetime

from mistudio.realtime import RelaySource

from .models import ExtractionExport, ExtractionJob, Model


def model_changes(since: datetime) -> list[tuple[str, str, datetime]]:
    """(row key, model id to announce, updated_at) of model and extraction rows written lately."""
    models = Model.objects.filter(updated_at__gte=since).values_list("id", "updated_at")
    jobs = ExtractionJob.objects.filter(updated_at__gte=since).values_list(
        "id", "model_id", "updated_at"
    )
    exports = ExtractionExport.objects.filter(updated_at__gte=since).values_list(
        "extraction_id", "extraction__model_id", "updated_at"
    )
    return (
        [(pk, pk, ts) for pk, ts in models]
        + [(pk, mid, ts) for pk, mid, ts in jobs]
        + [(f"export-{pk}", mid, ts) for pk, mid, ts in exports]
    )


MODELS_SOURCE = RelaySource(Model.live_group, "card.changed", model_changes)
