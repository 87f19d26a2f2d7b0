"""JSON API for extraction templates (architecture.md §6): the modal's schemas and services."""

from __future__ import annotations

from django.http import HttpRequest
from ninja import Query, Router

from mistudio.apischema import ERRORS

from . import selectors, services
from .schemas import (
    LIST_LIMIT_MAX,
    ExportIn,
    ExportOut,
    FavoriteIn,
    FavoriteOut,
    ImportOut,
    TemplateIn,
    TemplateListOut,
    TemplateOut,
)

router = Router(tags=["templates"])
OFFSET_MAX = 2**31 - 1  # beyond a 32-bit OFFSET some databases fail instead of returning nothing


@router.get("/extraction", response={200: TemplateListOut, **ERRORS})
def templates_list(
    request: HttpRequest,
    is_favorite: bool | None = None,
    limit: int = Query(50, ge=1, le=LIST_LIMIT_MAX),
    offset: int = Query(0, ge=0, le=OFFSET_MAX),
):
    rows, total = selectors.template_page(is_favorite=is_favorite, limit=limit, offset=offset)
    return {"templates": rows, "total": total, "limit": limit, "offset": offset}


@router.post("/extraction", response={201: TemplateOut, **ERRORS})
def templates_create(request: HttpRequest, payload: TemplateIn):
    return 201, services.template_create(**payload.model_dump())


@router.get("/extraction/{template_id}", response={200: TemplateOut, **ERRORS})
def templates_get(request: HttpRequest, template_id: str):
    return selectors.template_get(template_id)


@router.put("/extraction/{template_id}", response={200: TemplateOut, **ERRORS})
def templates_update(request: HttpRequest, template_id: str, payload: TemplateIn):
    """The create body; optional fields left out keep their current value."""
    return services.template_update(template_id, **payload.model_dump(exclude_unset=True))


@router.delete("/extraction/{template_id}", response={204: None, **ERRORS})
def templates_delete(request: HttpRequest, template_id: str):
    services.template_delete(template_id)
    return 204, None


@router.patch("/extraction/{template_id}/favorite", response={200: FavoriteOut, **ERRORS})
def templates_favorite(request: HttpRequest, template_id: str, payload: FavoriteIn):
    return services.template_favorite_set(template_id, is_favorite=payload.is_favorite)


@router.post("/export", response={200: ExportOut, **ERRORS})
def templates_export(request: HttpRequest, payload: ExportIn | None = None):
    return services.templates_export(ids=payload.ids if payload else None)


def _content_length(request: HttpRequest) -> int:
    try:
        return int(request.META.get("CONTENT_LENGTH") or 0)
    except ValueError:
        return 0


@router.post("/import", response={200: ImportOut, **ERRORS})
def templates_import(request: HttpRequest, on_conflict: str = "skip"):
    """Body: an export file. ?on_conflict=skip (default) | rename | overwrite."""
    services.import_size_check(_content_length(request))  # before reading the body
    return services.templates_import(raw=request.body, on_conflict=on_conflict)
