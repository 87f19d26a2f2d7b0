"""Reads of extraction templates: the API's pages and the extraction modal's section."""

from __future__ import annotations

import uuid

from django.db.models import QuerySet

from mistudio.errors import NotFound

from .models import ExtractionTemplate
from .schemas import LIST_LIMIT_MAX, ON_CONFLICT_LABELS


def template_get(template_id: str | uuid.UUID) -> ExtractionTemplate:
    try:
        return ExtractionTemplate.objects.get(pk=uuid.UUID(str(template_id)))
    except (ExtractionTemplate.DoesNotExist, ValueError):
        raise NotFound("No such template; it may have been deleted.") from None


def template_named(name: str) -> ExtractionTemplate:
    """The template called `name` (NotFound when there is none)."""
    row = ExtractionTemplate.objects.filter(name=name).first()
    if row is None:
        raise NotFound(f"No extraction template named {name!r}.")
    return row


def template_page(
    *, is_favorite: bool | None = None, limit: int = 50, offset: int = 0
) -> tuple[list[ExtractionTemplate], int]:
    """One page, newest first, and the total matching `is_favorite` (None: all)."""
    rows: QuerySet = ExtractionTemplate.objects.order_by("-created_at", "-id")
    if is_favorite is not None:
        rows = rows.filter(is_favorite=is_favorite)
    return list(rows[offset : offset + limit]), rows.count()


def section_context(open: bool) -> dict:  # noqa: A002 - the modal's contract names it `open`
    """What `section.html#templates_section` needs: templates favourites first then newest (at
    most LIST_LIMIT_MAX of them), their total count and whether the section starts expanded."""
    rows = ExtractionTemplate.objects.order_by("-is_favorite", "-created_at", "-id")
    return {
        "templates": list(rows[:LIST_LIMIT_MAX]),
        "count": rows.count(),
        "open": open,
        "on_conflict": list(ON_CONFLICT_LABELS.items()),
    }
