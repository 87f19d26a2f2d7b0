"""The "Extraction Templates" section of the extraction modal: parse → one service → render.

Every action answers with the whole section (`section.html#templates_section`, expanded), so the
count, the order (favourites first) and the list stay in step; errors are 4xx fragments that
HTMX swaps into `#templates-error`.
"""

from __future__ import annotations

import json
import re

from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.utils import timezone
from django.views.decorators.http import require_GET, require_POST
from pydantic import ValidationError as PydanticValidationError

from mistudio.errors import ServiceError

from . import selectors, services
from .schemas import TemplateSaveIn, errors_message, form_fields

SECTION = "templates_app/section.html"


MODEL_ID = re.compile(r"^m_[0-9a-f]{32}$")


def _model_id(request: HttpRequest) -> str:
    """The modal's model id (for the Load links); absent or malformed: the section works without.
    An unknown id gives links that answer 404, as for a model deleted while the modal is open."""
    model_id = request.POST.get("model_id") or request.GET.get("model_id") or ""
    return model_id if MODEL_ID.fullmatch(model_id) else ""


def _section(request: HttpRequest, status: int = 200, **extra) -> HttpResponse:
    if not request.htmx and request.method == "POST":
        return redirect("models:page")
    context = {
        "model_id": _model_id(request),
        "template_section": selectors.section_context(True),
        **extra,
    }
    return render(request, f"{SECTION}#templates_section", context, status=status)


def _error(request: HttpRequest, message: str, status: int) -> HttpResponse:
    response = render(request, f"{SECTION}#templates_error", {"error": message}, status=status)
    response["HX-Retarget"] = "#templates-error"
    response["HX-Reswap"] = "innerHTML"
    return response


@require_GET
def template_section(request: HttpRequest) -> HttpResponse:
    return _section(request)


@require_POST
def template_save(request: HttpRequest) -> HttpResponse:
    try:
        data = TemplateSaveIn.model_validate(form_fields(request.POST))
        row = services.template_create(**data.model_dump())
    except PydanticValidationError as exc:
        return _error(request, errors_message(exc), 422)
    except ServiceError as exc:
        return _error(request, exc.message, exc.status)
    return _section(request, status=201, notice=f"Saved template “{row.name}”.")


@require_POST
def template_delete(request: HttpRequest, template_id: str) -> HttpResponse:
    try:
        services.template_delete(template_id)
    except ServiceError as exc:
        return _error(request, exc.message, exc.status)
    return _section(request, notice="Template deleted.")


@require_POST
def template_favorite(request: HttpRequest, template_id: str) -> HttpResponse:
    is_favorite = request.POST.get("is_favorite") == "true"
    try:
        services.template_favorite_set(template_id, is_favorite=is_favorite)
    except ServiceError as exc:
        return _error(request, exc.message, exc.status)
    return _section(request)


def export_response(data: dict) -> HttpResponse:
    """An export as a download named miStudio-templates-YYYY-MM-DD.json (also used by the admin)."""
    response = HttpResponse(
        json.dumps(data, indent=2, ensure_ascii=False),
        content_type="application/json; charset=utf-8",
    )
    filename = f"miStudio-templates-{timezone.localdate():%Y-%m-%d}.json"
    response["Content-Disposition"] = f'attachment; filename="{filename}"'
    return response


@require_GET
def templates_export_file(request: HttpRequest) -> HttpResponse:
    return export_response(services.templates_export())


@require_POST
def templates_import_file(request: HttpRequest) -> HttpResponse:
    upload = request.FILES.get("file")
    if upload is None:
        return _error(request, "Choose a .json file exported by miStudio.", 400)
    try:
        services.import_size_check(upload.size)  # before reading a byte of it
        summary = services.templates_import(
            raw=upload.read(), on_conflict=request.POST.get("on_conflict") or "skip"
        )
    except ServiceError as exc:
        return _error(request, exc.message, exc.status)
    return _section(request, import_summary=summary, on_conflict=request.POST.get("on_conflict"))
