"""HTML views of the Datasets panel: parse → one service call → render (page or HTMX partial)."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.csrf import csrf_exempt, csrf_protect
from django.views.decorators.http import require_GET, require_POST
from pydantic import ValidationError

from mistudio.errors import Invalid, ServiceError
from mistudio.validation import validation_message

from . import selectors, services
from .schemas import HubImportIn, UploadIn

PAGE = "datasets_app/datasets.html"
SECTION = "#dataset-section"


def _page_context(**extra) -> dict:
    return {"datasets": selectors.dataset_list(), **extra}


def _partial(request: HttpRequest, name: str, context: dict, status: int = 200) -> HttpResponse:
    return render(request, f"{PAGE}#{name}", context, status=status)


def _error(
    request: HttpRequest, message: str, status: int, target: str, slot: str = "error"
) -> HttpResponse:
    """A 4xx with the message: HTMX swaps it into `target`; a plain request gets the page with
    the message in `slot` (upload_error, import_error or error)."""
    if request.htmx:
        response = _partial(request, "form_error", {"error": message}, status=status)
        response["HX-Retarget"] = target
        response["HX-Reswap"] = "innerHTML"
        return response
    return render(request, PAGE, _page_context(**{slot: message}), status=status)


def _created(request: HttpRequest) -> HttpResponse:
    if request.htmx:
        return _partial(request, "dataset_section", _page_context(), status=201)
    return redirect("datasets:page")


@require_GET
def datasets_page(request: HttpRequest) -> HttpResponse:
    if request.htmx and not request.htmx.boosted:
        return _partial(request, "dataset_section", _page_context())
    return render(request, PAGE, _page_context())


@csrf_exempt  # the size check must come before the CSRF check parses the body
@require_POST
def dataset_upload(request: HttpRequest) -> HttpResponse:
    try:
        services.upload_length_check(request.META.get("CONTENT_LENGTH"))
    except ServiceError as exc:
        return _error(request, exc.message, exc.status, "#upload-error", "upload_error")
    return _dataset_upload(request)


@csrf_protect
def _dataset_upload(request: HttpRequest) -> HttpResponse:
    try:
        data = UploadIn.model_validate(request.POST.dict())
        upload = request.FILES.get("file")
        if upload is None:
            raise Invalid("Choose a file to upload.", code="no_file")
        services.dataset_upload(upload=upload, **data.model_dump())
    except ValidationError as exc:
        return _error(request, validation_message(exc), 422, "#upload-error", "upload_error")
    except ServiceError as exc:
        return _error(request, exc.message, exc.status, "#upload-error", "upload_error")
    return _created(request)


@require_POST
def dataset_import(request: HttpRequest) -> HttpResponse:
    try:
        data = HubImportIn.model_validate(request.POST.dict())
        services.dataset_import(**data.model_dump())
    except ValidationError as exc:
        return _error(request, validation_message(exc), 422, "#import-error", "import_error")
    except ServiceError as exc:
        return _error(request, exc.message, exc.status, "#import-error", "import_error")
    return _created(request)


@require_GET
def dataset_card(request: HttpRequest, dataset_id: str) -> HttpResponse:
    try:
        dataset = services.dataset_get(dataset_id)
    except ServiceError as exc:
        return _error(request, exc.message, exc.status, f"#dataset-{dataset_id}-error")
    if request.htmx:
        return _partial(request, "dataset_card", {"dataset": dataset})
    return redirect("datasets:page")


@require_POST
def dataset_cancel(request: HttpRequest, dataset_id: str) -> HttpResponse:
    try:
        dataset = services.dataset_cancel(dataset_id)
    except ServiceError as exc:
        return _error(request, exc.message, exc.status, f"#dataset-{dataset_id}-error")
    if request.htmx:
        return _partial(request, "dataset_card", {"dataset": dataset})
    return redirect("datasets:page")


@require_POST
def dataset_delete(request: HttpRequest, dataset_id: str) -> HttpResponse:
    try:
        services.dataset_delete(dataset_id)
    except ServiceError as exc:
        return _error(request, exc.message, exc.status, f"#dataset-{dataset_id}-error")
    if request.htmx:
        return _partial(request, "dataset_section", _page_context())
    return redirect("datasets:page")
