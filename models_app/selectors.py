"""Reads of models and extractions for pages, the API, the CLI and the websocket."""

from __future__ import annotations

from functools import lru_cache

import torch
from django.conf import settings
from django.db.models import Count, Prefetch, QuerySet

from mistudio.errors import Conflict, Invalid, NotFound

from .ml.device import device_info, resolve_device
from .models import EXTRACTION_ACTIVE, ExtractionJob, Model, ModelStatus


def model_get(model_id: str) -> Model:
    try:
        return Model.objects.get(pk=model_id)
    except (Model.DoesNotExist, ValueError):
        raise NotFound(f"No model with id {model_id}.") from None


def model_list(*, status: str | None = None) -> QuerySet[Model]:
    """Models newest first, with `extraction_count` and `active_extractions` for the cards."""
    active = ExtractionJob.objects.filter(status__in=EXTRACTION_ACTIVE).order_by("-created_at")
    # An aggregate drops Meta.ordering (GROUP BY query): order explicitly, newest first.
    qs = (
        Model.objects.annotate(extraction_count=Count("extractions"))
        .prefetch_related(Prefetch("extractions", queryset=active, to_attr="active_extractions"))
        .order_by("-created_at")
    )
    if status:
        if status not in ModelStatus.values:
            raise Invalid(f"status must be one of {', '.join(ModelStatus.values)}.")
        qs = qs.filter(status=status)
    return qs


def model_card_get(model_id: str) -> Model:
    """One model with what its card shows (see model_list)."""
    try:
        return model_list().get(pk=model_id)
    except (Model.DoesNotExist, ValueError):
        raise NotFound(f"No model with id {model_id}.") from None


def model_resolve(ref: str, quantization: str | None = None) -> Model:
    """A model by id, or by repo id among the ready models (`quantization` picks among several).
    NotFound when nothing matches, Conflict when the repo is ready at several quantizations."""
    row = Model.objects.filter(pk=ref).first()
    if row:
        return row
    rows = Model.objects.filter(hf_repo_id=ref, status=ModelStatus.READY)
    if quantization:
        rows = rows.filter(quantization=quantization)
    rows = list(rows)
    if not rows:
        raise NotFound(
            f"No ready model {ref!r}; download it first (the Models page or GET /api/models"
            " show ids)."
        )
    if len(rows) > 1:
        choices = ", ".join(f"{r.quantization} ({r.pk})" for r in rows)
        raise Conflict(
            f"{ref} is downloaded at several quantizations: {choices}."
            " Pass --quantization or a model id."
        )
    return rows[0]


def model_architecture(model_id: str) -> dict:
    """The architecture recorded by the load check (real config and modules)."""
    row = model_get(model_id)
    arch = (row.metadata or {}).get("architecture")
    if row.status != ModelStatus.READY or not arch:
        raise Conflict(f"{row.hf_repo_id} is {row.status}; its architecture is known once ready.")
    return arch


@lru_cache(maxsize=1)
def device() -> torch.device:
    """The device GPU jobs run on (MISTUDIO_DEVICE)."""
    return resolve_device(settings.MISTUDIO_DEVICE)


def device_summary() -> dict:
    """The device jobs run on, with its memory (bytes) and the models loaded on it."""
    info = device_info(device())
    info["loaded"] = list(
        Model.objects.filter(is_loaded=True).values_list("name", "quantization", "mem_req_bytes")
    )
    return info


def extraction_get(extraction_id: str) -> ExtractionJob:
    try:
        return ExtractionJob.objects.select_related("model").get(pk=extraction_id)
    except (ExtractionJob.DoesNotExist, ValueError):
        raise NotFound(f"No extraction with id {extraction_id}.") from None


def extraction_list(*, model_id: str) -> QuerySet[ExtractionJob]:
    """A model's extractions, newest first (NotFound for an unknown model)."""
    model_get(model_id)
    return ExtractionJob.objects.filter(model_id=model_id)
