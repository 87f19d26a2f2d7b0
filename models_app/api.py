"""JSON API for models (architecture.md §6): same schemas and services as the HTML views."""

from __future__ import annotations

from django.http import HttpRequest
from ninja import Router

from mistudio.apischema import ERRORS
from mistudio.humanize import bytes_h, params_h
from mistudio.validation import json_object, validated

from . import exports, extraction, selectors, services, share, sites
from .models import ExtractionJob, Model, PushJob
from .schemas import (
    AddCachedIn,
    ArchitectureOut,
    CachedRepoOut,
    DownloadIn,
    EstimateOut,
    ExportIn,
    ExportOut,
    ExtractionEstimateIn,
    ExtractionIn,
    ExtractionOut,
    ExtractionPartOut,
    ExtractionStarted,
    ModelOut,
    PushIn,
    PushOut,
    RetryIn,
    SearchIn,
    SearchOut,
    SiteOut,
    SitesIn,
)

router = Router(tags=["models"])


def model_json(m: Model) -> dict:
    mem = m.mem_req_bytes if m.mem_req_bytes is not None else m.mem_estimate_bytes
    return {
        **{f: getattr(m, f) for f in ModelOut.model_fields if hasattr(m, f)},
        "params_display": params_h(m.params),
        "memReq": bytes_h(mem),
    }


@router.get("", response=list[ModelOut])
def models_list(request: HttpRequest, status: str | None = None):
    return [model_json(m) for m in selectors.model_list(status=status)]


@router.post("/download", response={201: ModelOut, **ERRORS})
def models_download(request: HttpRequest, payload: DownloadIn):
    return 201, model_json(services.model_download(**payload.model_dump()))


@router.get("/search", response={200: SearchOut, **ERRORS})
def models_search(request: HttpRequest, q: str):
    """Text-generation models on the Hub whose id contains `q`, with the fit per quantization."""
    data = validated(SearchIn, {"q": q}, where="query")
    return selectors.hub_search(data.q)


@router.get("/cache", response=list[CachedRepoOut])
def models_cache(request: HttpRequest):
    """Complete model snapshots in the local HF cache (other tools' downloads) to add."""
    return selectors.cached_repos()


@router.post("/add-cached", response={201: ModelOut, **ERRORS})
def models_add_cached(request: HttpRequest, payload: AddCachedIn):
    return 201, model_json(services.model_add_cached(**payload.model_dump()))


@router.get("/{model_id}", response={200: ModelOut, **ERRORS})
def models_get(request: HttpRequest, model_id: str):
    return model_json(selectors.model_get(model_id))


@router.delete("/{model_id}", response={204: None, **ERRORS})
def models_delete(request: HttpRequest, model_id: str):
    services.model_delete(model_id)
    return 204, None


@router.post("/{model_id}/cancel", response={200: ModelOut, **ERRORS})
def models_cancel(request: HttpRequest, model_id: str):
    return model_json(services.model_cancel(model_id))


RETRY_BODY = {"requestBody": {"required": False, "content": {"application/json": {
    "schema": RetryIn.model_json_schema()}}}}  # fmt: skip


@router.post("/{model_id}/retry", response={202: ModelOut, **ERRORS}, openapi_extra=RETRY_BODY)
def models_retry(request: HttpRequest, model_id: str):
    """Download a failed or cancelled model again; the JSON body {access_token} is optional (a
    gated repo needs its token again: tokens are dropped when a job ends)."""
    is_json = request.content_type == "application/json"
    body = json_object(request.body, optional=True) if is_json else request.POST.dict()
    data = validated(RetryIn, body)
    return 202, model_json(services.model_retry(model_id, **data.model_dump()))


@router.post("/{model_id}/load", response={202: ModelOut, **ERRORS})
def models_load(request: HttpRequest, model_id: str):
    return 202, model_json(services.model_load(model_id))


@router.post("/{model_id}/unload", response={202: ModelOut, **ERRORS})
def models_unload(request: HttpRequest, model_id: str):
    return 202, model_json(services.model_unload(model_id))


@router.get("/{model_id}/architecture", response={200: ArchitectureOut, **ERRORS})
def models_architecture(request: HttpRequest, model_id: str):
    return selectors.model_architecture(model_id)


def export_json(row) -> dict | None:
    return None if row is None else {f: getattr(row, f) for f in ExportOut.model_fields}


def extraction_json(job: ExtractionJob) -> dict:
    fields = [f for f in ExtractionOut.model_fields if f not in ("export", "parts")]
    parts = job.parts.values(*ExtractionPartOut.model_fields)
    return {**{f: getattr(job, f) for f in fields}, "export": export_json(job.saelens_export),
            "parts": list(parts)}  # fmt: skip


@router.post("/{model_id}/extract-activations", response={202: ExtractionStarted, **ERRORS})
def models_extract(request: HttpRequest, model_id: str, payload: ExtractionIn):
    job = extraction.extraction_start(model_id=model_id, **payload.model_dump())
    return 202, {"extraction_id": job.pk, "status": job.status}


@router.post("/{model_id}/extract-estimate", response={200: EstimateOut, **ERRORS})
def models_extract_estimate(request: HttpRequest, model_id: str, payload: ExtractionEstimateIn):
    """Before Start: the bytes an extraction would write (tokens × sites × d × bytes, plus the
    SAELens folder if chosen) and the free disk in the output folder; `fits` says if it fits."""
    return extraction.extraction_estimate(model_id, **payload.model_dump())


@router.post("/{model_id}/sites", response={200: list[SiteOut], **ERRORS})
def models_sites(request: HttpRequest, model_id: str, payload: SitesIn):
    """Check sites against the model before an extraction: each with its module and shape."""
    return sites.sites_check(model_id, **payload.model_dump())


@router.get("/{model_id}/extractions", response={200: list[ExtractionOut], **ERRORS})
def models_extractions(request: HttpRequest, model_id: str):
    return [extraction_json(j) for j in selectors.extraction_list(model_id=model_id)]


extractions_router = Router(tags=["extractions"])


@extractions_router.get("/{extraction_id}", response={200: ExtractionOut, **ERRORS})
def extractions_get(request: HttpRequest, extraction_id: str):
    return extraction_json(selectors.extraction_get(extraction_id))


@extractions_router.post("/{extraction_id}/cancel", response={200: ExtractionOut, **ERRORS})
def extractions_cancel(request: HttpRequest, extraction_id: str):
    return extraction_json(extraction.extraction_cancel(extraction_id))


@extractions_router.delete("/{extraction_id}", response={204: None, **ERRORS})
def extractions_delete(request: HttpRequest, extraction_id: str):
    extraction.extraction_delete(extraction_id)
    return 204, None


@extractions_router.post("/{extraction_id}/export", response={202: ExportOut, **ERRORS})
def extractions_export(request: HttpRequest, extraction_id: str, payload: ExportIn):
    """Export a completed extraction as a SAELens `datasets` folder, in the background (409 when
    it is not completed, or exported or being exported already)."""
    return 202, export_json(exports.extraction_export_start(extraction_id, **payload.model_dump()))


def push_json(push: PushJob) -> dict:
    return {f: getattr(push, f) for f in PushOut.model_fields}


@extractions_router.post("/{extraction_id}/push", response={202: PushOut, **ERRORS})
def extractions_push(request: HttpRequest, extraction_id: str, payload: PushIn):
    """Push a completed extraction (manifest, shards, a generated dataset card) to a Hub dataset
    repo, private unless `private` is false. The token needs write access; it is kept sealed
    only until the push ends and never returned. Progress: GET …/pushes/{push_id}."""
    push = share.extraction_push(extraction_id, **payload.model_dump())
    return 202, push_json(push)


@extractions_router.get("/{extraction_id}/pushes", response={200: list[PushOut], **ERRORS})
def extractions_pushes(request: HttpRequest, extraction_id: str):
    """The pushes of an extraction, newest first."""
    return [push_json(p) for p in selectors.push_list(extraction_id)]


@extractions_router.get("/{extraction_id}/pushes/{push_id}", response={200: PushOut, **ERRORS})
def extractions_push_get(request: HttpRequest, extraction_id: str, push_id: str):
    return push_json(selectors.push_get(extraction_id, push_id))
