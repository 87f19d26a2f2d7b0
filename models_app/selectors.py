"""Reads of models and extractions for pages, the API, the CLI and the websocket."""

from __future__ import annotations

from functools import lru_cache

import torch
from django.conf import settings
from django.db.models import Count, Prefetch, QuerySet

from mistudio.errors import Conflict, Invalid, NotFound
from mistudio.hub import models_search

from .ml.device import device_info, resolve_device
from .ml.estimate import fit_label, rough_memory
from .models import EXTRACTION_ACTIVE, ExtractionJob, Model, ModelStatus
from .repo import cached_snapshots


def model_get(model_id: str) -> Model:
    try:
        return Model.objects.get(pk=model_id)
    except (Model.DoesNotExist, ValueError):
        raise NotFound(f"No model with id {model_id}.") from None


def model_list(*, status: str | None = None) -> QuerySet[Model]:
    """Models newest first, with `extraction_count`, `active_extractions` and
    `latest_extractions` (the newest one, whose completion notice the card shows) for the cards."""
    jobs = ExtractionJob.objects.select_related("export").order_by("-created_at")
    active, latest = jobs.filter(status__in=EXTRACTION_ACTIVE), jobs[:1]
    # An aggregate drops Meta.ordering (GROUP BY query): order explicitly, newest first.
    qs = (
        Model.objects.annotate(extraction_count=Count("extractions"))
        .prefetch_related(
            Prefetch("extractions", queryset=active, to_attr="active_extractions"),
            Prefetch("extractions", queryset=latest, to_attr="latest_extractions"),
        )
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


def hub_search(query: str, *, token: str | None = None) -> dict:
    """Text-generation models on the Hub matching `query`, each with a rough memory need and fit
    per quantization on this device (from the Hub's parameter count; the estimate after a click
    reads the config): {query, device, results: [{id, downloads, likes, gated, params,
    fits: [{quantization, bytes, fit, label}]}]}."""
    dev = device_summary()
    results = models_search(query, endpoint=settings.HF_ENDPOINT, token=token)
    for result in results:
        needs = rough_memory(result["params"], dev["kind"]) if result["params"] else {}
        result["fits"] = fit_rows(needs, dev)
    return {"query": query, "device": dev, "results": results}


def fit_rows(needs: dict[str, int], dev: dict) -> list[dict]:
    """[{quantization, bytes, fit, label}] for bytes needed per quantization on device `dev`."""
    rows = []
    for quantization, needed in needs.items():
        code, label = fit_label(needed, dev)
        rows.append({"quantization": quantization, "bytes": needed, "fit": code, "label": label})
    return rows


def cached_repos() -> list[dict]:
    """Complete model snapshots in the local HF cache that can be added without downloading:
    [{repo_id, commit, size_bytes, path, added: [quantizations already in our models]}]."""
    ours: dict[str, list[str]] = {}
    for repo_id, quantization in Model.objects.exclude(
        status__in=("error", "cancelled")
    ).values_list("hf_repo_id", "quantization"):
        ours.setdefault(repo_id, []).append(quantization)
    return [
        {
            "repo_id": s.repo_id,
            "commit": s.commit,
            "size_bytes": s.size_bytes,
            "path": str(s.path),
            "added": sorted(ours.get(s.repo_id, [])),
        }
        for s in cached_snapshots(settings.MODELS_CACHE_DIR)
    ]


def extraction_get(extraction_id: str) -> ExtractionJob:
    try:
        return ExtractionJob.objects.select_related("model", "export").get(pk=extraction_id)
    except (ExtractionJob.DoesNotExist, ValueError):
        raise NotFound(f"No extraction with id {extraction_id}.") from None


def extraction_list(*, model_id: str) -> QuerySet[ExtractionJob]:
    """A model's extractions, newest first (NotFound for an unknown model)."""
    model_get(model_id)
    return ExtractionJob.objects.filter(model_id=model_id).select_related("export")
