"""Extraction-template services: the one place for the rules of saving, favouriting, exporting and
importing templates. Views, the JSON API and the admin call these; inputs that come from users are
validated by `schemas.TemplateIn` (or, for imports, here, item by item)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from django.db import IntegrityError, transaction
from django.utils import timezone
from pydantic import ValidationError as PydanticValidationError

from mistudio import limits
from mistudio.errors import Conflict, Invalid, ServiceError
from mistudio.jsonparse import json_loads

from .models import ExtractionTemplate
from .schemas import (
    EXPORT_VERSION,
    IMPORT_MAX_BYTES,
    ON_CONFLICT,
    ImportFile,
    TemplateImportItem,
    TemplateOut,
    errors_message,
)
from .selectors import template_get

DUPLICATE_MESSAGE = "A template with this name already exists; pick another name."


def _name_taken(name: str, *, exclude: uuid.UUID | None = None) -> bool:
    return ExtractionTemplate.objects.filter(name=name).exclude(pk=exclude).exists()


def template_create(**fields: Any) -> ExtractionTemplate:
    """Save a new template from `TemplateIn` fields. Raises Conflict (409) for a taken name."""
    if _name_taken(fields["name"]):
        raise Conflict(DUPLICATE_MESSAGE, code="duplicate")
    try:
        with transaction.atomic():
            return ExtractionTemplate.objects.create(**fields)
    except IntegrityError:  # saved by someone else between the check and the insert
        raise Conflict(DUPLICATE_MESSAGE, code="duplicate") from None


def template_update(template_id: str | uuid.UUID, **fields: Any) -> ExtractionTemplate:
    """Replace the given fields (fields left out keep their value). Conflict for a taken name."""
    row = template_get(template_id)
    if "name" in fields and _name_taken(fields["name"], exclude=row.pk):
        raise Conflict(DUPLICATE_MESSAGE, code="duplicate")
    for key, value in fields.items():
        setattr(row, key, value)
    try:
        with transaction.atomic():
            row.save()
    except IntegrityError:
        raise Conflict(DUPLICATE_MESSAGE, code="duplicate") from None
    return row


def template_delete(template_id: str | uuid.UUID) -> None:
    template_get(template_id).delete()


def template_favorite_set(template_id: str | uuid.UUID, *, is_favorite: bool) -> ExtractionTemplate:
    row = template_get(template_id)
    row.is_favorite = is_favorite
    row.save(update_fields=["is_favorite", "updated_at"])
    return row


def _free_name(base: str, word: str = "") -> str:
    """`base`, or `base (copy)`, `base (2)`, … the first one no template uses, within NAME_MAX."""
    candidates = [f" ({word})"] if word else []
    candidates += [f" ({n})" for n in range(2, 1000)]
    if not word and not _name_taken(base):
        return base
    for suffix in candidates:
        name = base[: limits.NAME_MAX - len(suffix)].rstrip() + suffix
        if not _name_taken(name):
            return name
    return base[: limits.NAME_MAX - 33] + f" {uuid.uuid4().hex}"


def template_duplicate(template_id: str | uuid.UUID) -> ExtractionTemplate:
    """A copy named `<name> (copy)` (or the next free name), not a favourite."""
    source = template_get(template_id)
    fields = _settings(TemplateOut.model_validate(source))
    fields.update(name=_free_name(source.name, "copy"), is_favorite=False)
    return template_create(**fields)


def template_json(row: ExtractionTemplate) -> dict:
    return TemplateOut.model_validate(row).model_dump(mode="json")


def templates_export(*, ids: list[uuid.UUID] | None = None) -> dict:
    """{version, exported_at, extraction_templates[]} with every field, ids and timestamps
    included, oldest first (plain JSON types, ready for json.dumps)."""
    rows = ExtractionTemplate.objects.order_by("created_at", "id")
    if ids is not None:
        rows = rows.filter(pk__in=ids)
    return {
        "version": EXPORT_VERSION,
        "exported_at": timezone.now().isoformat().replace("+00:00", "Z"),
        "extraction_templates": [template_json(row) for row in rows],
    }


class TooLarge(ServiceError):
    status = 413
    code = "too_large"


def import_size_check(size: int) -> None:
    if size > IMPORT_MAX_BYTES:
        raise TooLarge(
            f"The file is over {IMPORT_MAX_BYTES // 1024 // 1024} MB; export fewer "
            "templates per file."
        )


def _parse_file(raw: bytes) -> ImportFile:
    import_size_check(len(raw))
    try:
        data = json_loads(raw)
    except ValueError:  # bad JSON or text, digits over Python's limit, nesting
        raise ServiceError(
            "The file is not valid JSON; choose a file exported by miStudio.",
            code="bad_json",
            status=400,
        ) from None
    if not isinstance(data, dict):
        raise Invalid("An export file is a JSON object with version and extraction_templates.")
    try:
        envelope = ImportFile.model_validate(data)
    except PydanticValidationError as exc:
        raise Invalid(f"Not a miStudio export file. {errors_message(exc)}") from None
    return envelope


@dataclass
class ImportSummary:
    imported: int = 0
    skipped: int = 0
    errors: list[dict] = field(default_factory=list)

    def error(self, index: int, reason: str) -> None:
        self.errors.append({"kind": "extraction_templates", "index": index, "reason": reason})

    def as_dict(self) -> dict:
        return {
            "imported": {"extraction_templates": self.imported},
            "skipped": {"extraction_templates": self.skipped},
            "errors": self.errors,
        }


def _settings(item: TemplateOut | TemplateImportItem) -> dict:
    return item.model_dump(exclude={"id", "created_at", "updated_at"})


def _insert(item: TemplateImportItem, *, name: str, pk: uuid.UUID | None) -> None:
    fields = {**_settings(item), "name": name}
    row = ExtractionTemplate.objects.create(
        pk=pk or uuid.uuid4(), created_at=item.created_at or timezone.now(), **fields
    )
    if item.updated_at:  # auto_now stamped the insert; restore the exported time
        ExtractionTemplate.objects.filter(pk=row.pk).update(updated_at=item.updated_at)


def _overwrite(row: ExtractionTemplate, item: TemplateImportItem) -> None:
    for key, value in _settings(item).items():
        setattr(row, key, value)
    if item.created_at:
        row.created_at = item.created_at
    row.save()
    if item.updated_at:
        ExtractionTemplate.objects.filter(pk=row.pk).update(updated_at=item.updated_at)


def _place(item: TemplateImportItem, on_conflict: str) -> str | None:
    """Write one valid item; return "imported", "skipped", or None for an unresolvable clash."""
    by_id = ExtractionTemplate.objects.filter(pk=item.id).first() if item.id else None
    by_name = ExtractionTemplate.objects.filter(name=item.name).first()
    if by_id is None and by_name is None:
        _insert(item, name=item.name, pk=item.id)
    elif on_conflict == "skip":
        return "skipped"
    elif on_conflict == "rename":
        _insert(
            item,
            name=_free_name(item.name) if by_name else item.name,
            pk=None if by_id else item.id,
        )
    elif by_id and by_name and by_id.pk != by_name.pk:
        return None
    elif by_id or item.id is None:
        _overwrite(by_id or by_name, item)
    else:
        by_name.delete()  # the file wins, with its own id
        _insert(item, name=item.name, pk=item.id)
    return "imported"


CLASH_REASON = (
    "Its id belongs to one template and its name to another; rename or delete one of them first."
)


def _import_item(index: int, raw_item: Any, on_conflict: str, summary: ImportSummary) -> None:
    if not isinstance(raw_item, dict):
        summary.error(index, "Each template is a JSON object.")
        return
    try:
        item = TemplateImportItem.model_validate(raw_item)
    except PydanticValidationError as exc:
        summary.error(index, errors_message(exc))
        return
    try:
        with transaction.atomic():
            outcome = _place(item, on_conflict)
    except IntegrityError:
        outcome = None
    if outcome is None:
        summary.error(index, CLASH_REASON)
    else:
        setattr(summary, outcome, getattr(summary, outcome) + 1)


def templates_import(*, raw: bytes, on_conflict: str = "skip") -> dict:
    """Import an export file, all in one transaction.

    A file that is too big (413), not JSON (400) or not an export (422) is refused whole and
    changes nothing. Inside a valid file each bad item is reported as {kind, index, reason} and
    left out while the valid ones import. A template whose id or name is already here (or earlier
    in the same file) is skipped (`skip`, the default), imported as a copy with a fresh id and/or
    a free name "<name> (2)" (`rename`), or replaced by the file's version (`overwrite`: matched
    by id, else by name; the file's id wins; an id of one template with the name of another is
    an item error). Ids and timestamps are kept (an item without them gets a new id and "now"),
    so export → import into an empty database gives identical rows.
    Returns {imported: {extraction_templates}, skipped: {extraction_templates}, errors[]}.
    """
    if on_conflict not in ON_CONFLICT:
        raise Invalid(f"on_conflict must be one of {', '.join(ON_CONFLICT)}.")
    envelope = _parse_file(raw)
    summary = ImportSummary()
    with transaction.atomic():
        for index, raw_item in enumerate(envelope.extraction_templates):
            _import_item(index, raw_item, on_conflict, summary)
    return summary.as_dict()
