"""JSON API for datasets (architecture.md §6): same schemas and services as the HTML views.

POST /api/datasets takes either a multipart upload (name?, file, text_field) → 202 with the
queued row (the file stored and its first rows checked; a worker normalizes it), or JSON
{hf_dataset_id, split, text_field, revision?, access_token?, name?} → 202 with the queued Hub
import. Either row then moves to ready, error or cancelled (GET it, or watch /ws/datasets/).
"""

from __future__ import annotations

from functools import wraps

from django.http import HttpRequest, JsonResponse
from ninja import Router
from ninja.decorators import decorate_view

from mistudio.apischema import ERRORS
from mistudio.errors import Invalid, ServiceError
from mistudio.validation import json_object, validated

from . import selectors, services
from .models import Dataset
from .schemas import DatasetOut, HubImportIn, UploadIn

router = Router(tags=["datasets"])
UPLOAD_FORM = {
    "type": "object",
    "required": ["file"],
    "properties": {
        "file": {
            "type": "string",
            "format": "binary",
            "description": ".txt (one document per line), .jsonl, .csv or .parquet",
        },
        "name": {"type": "string"},
        "text_field": {
            "type": "string",
            "default": "text",
            "description": "the JSON field or column holding the text",
        },
    },
}
CREATE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": HubImportIn.model_json_schema()},
            "multipart/form-data": {"schema": UPLOAD_FORM},
        },
    }
}


def dataset_json(d: Dataset) -> dict:
    return {f: getattr(d, f) for f in DatasetOut.model_fields}


def _upload_guard(run):
    """Refuse an over-limit body (413) before anything parses it."""

    @wraps(run)
    def wrapper(request: HttpRequest, *args, **kwargs):
        try:
            services.upload_length_check(request.META.get("CONTENT_LENGTH"))
        except ServiceError as exc:
            return JsonResponse({"detail": exc.message, "code": exc.code}, status=exc.status)
        return run(request, *args, **kwargs)

    return wrapper


def _json_object(request: HttpRequest) -> dict:
    try:
        return json_object(
            request.body or b"",
            hint="a JSON object {hf_dataset_id, split, text_field, revision?} or a multipart"
            " upload with a file",
        )
    except Invalid as exc:  # this route has always answered 400 for a body that is no object
        raise ServiceError(exc.message, code=exc.code, status=400) from None


def _create_from_upload(request: HttpRequest) -> Dataset:
    data = validated(UploadIn, request.POST.dict())
    upload = request.FILES.get("file")
    if upload is None:
        raise Invalid("Attach the dataset file as the multipart field 'file'.", code="no_file")
    return services.dataset_upload(upload=upload, **data.model_dump())


@router.get("", response=list[DatasetOut])
def datasets_list(request: HttpRequest, status: str | None = None):
    return [dataset_json(d) for d in selectors.dataset_list(status=status)]


@router.post("", response={202: DatasetOut, **ERRORS}, openapi_extra=CREATE_BODY)
@decorate_view(_upload_guard)
def datasets_create(request: HttpRequest):
    if request.content_type == "multipart/form-data":
        row = _create_from_upload(request)
    else:
        data = validated(HubImportIn, _json_object(request))
        row = services.dataset_import(**data.model_dump())
    return 202, dataset_json(row)  # queued: a worker imports or normalizes it


@router.get("/{dataset_id}", response={200: DatasetOut, **ERRORS})
def datasets_get(request: HttpRequest, dataset_id: str):
    return dataset_json(services.dataset_get(dataset_id))


@router.delete("/{dataset_id}", response={204: None, **ERRORS})
def datasets_delete(request: HttpRequest, dataset_id: str):
    services.dataset_delete(dataset_id)
    return 204, None


@router.post("/{dataset_id}/cancel", response={200: DatasetOut, **ERRORS})
def datasets_cancel(request: HttpRequest, dataset_id: str):
    return dataset_json(services.dataset_cancel(dataset_id))
