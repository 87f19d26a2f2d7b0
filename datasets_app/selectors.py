"""Reads of dataset rows for pages, the API and the extraction form."""

from __future__ import annotations

from django.db.models import QuerySet
from django.db.models.functions import Lower

from mistudio.errors import Invalid

from .models import Dataset, DatasetStatus


def dataset_list(*, status: str | None = None) -> QuerySet[Dataset]:
    """Datasets, newest first, optionally of one status (Invalid for an unknown status)."""
    qs = Dataset.objects.all()
    if status:
        if status not in DatasetStatus.values:
            raise Invalid(f"status must be one of {', '.join(DatasetStatus.values)}.")
        qs = qs.filter(status=status)
    return qs


def dataset_options() -> list[tuple[str, str]]:
    """[(id, "{name} ({row_count} samples)")] for ready datasets, by name (any case): the extraction
    form's dataset select."""
    rows = Dataset.objects.filter(status=DatasetStatus.READY).order_by(Lower("name"), "id")
    return [
        (pk, f"{name} ({count} samples)")
        for pk, name, count in rows.values_list("id", "name", "row_count")
    ]
