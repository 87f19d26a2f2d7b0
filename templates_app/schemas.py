"""The one validation source for extraction templates: the JSON API (create, update), the save
form in the extraction modal, the admin form and every imported item all use `TemplateIn`."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from django.utils import timezone
from ninja import Schema
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    model_validator,
)
from pydantic import ValidationError as PydanticValidationError

from mistudio import limits
from mistudio.validation import ModuleSites, module_sites_from_text

EXPORT_VERSION = 1
IMPORT_MAX_BYTES = 1024 * 1024  # the cap is checked before any parsing
IMPORT_MAX_TEMPLATES = 2000  # a 1 MB file holds fewer than this many real templates
LIST_LIMIT_MAX = 500
ON_CONFLICT = ("skip", "rename", "overwrite")
# What each choice does, as the admin's import form and the modal's Import offer it.
ON_CONFLICT_LABELS = {
    "skip": "Skip templates whose id or name is already here",
    "rename": "Import them as copies under a free name",
    "overwrite": "Replace the existing ones with the file's",
}

LABELS = {
    "name": "Name",
    "description": "Description",
    "layers": "Layers",
    "hook_types": "Hook types",
    "module_sites": "Module paths",
    "path": "Module path",
    "io": "Input or output",
    "max_samples": "Max samples",
    "batch_size": "Batch size",
    "context_size": "Context size",
    "top_k_examples": "Top-k examples",
    "special_tokens": "Special tokens",
    "output_format": "Output format",
    "is_favorite": "Favourite",
    "id": "Id",
    "created_at": "Created at",
    "updated_at": "Updated at",
    "version": "Version",
    "exported_at": "Exported at",
    "extraction_templates": "extraction_templates",
}


def _not_bool(value: Any) -> Any:
    # pydantic's lax mode reads true as 1; a layer or a size is never a boolean.
    if isinstance(value, bool):
        raise ValueError("must be a whole number, not true/false.")
    return value


def _bounded(label: str, low: int, high: int):
    def check(value: int) -> int:
        if not low <= value <= high:
            raise ValueError(f"{label} must be between {low:,} and {high:,}.")
        return value

    return check


def _number(label: str, low: int, high: int):
    return Annotated[int, BeforeValidator(_not_bool), AfterValidator(_bounded(label, low, high))]


def _text(label: str, max_len: int, *, required: bool, multiline: bool):
    def clean(value: str) -> str:
        value = value.strip()
        if required and not value:
            raise ValueError(f"{label} is required: give the template a name.")
        if len(value) > max_len:
            raise ValueError(f"{label} is at most {max_len} characters.")
        allowed = "\n\t\r" if multiline else ""
        if not all(c.isprintable() or c in allowed for c in value):
            raise ValueError(f"{label} holds control or invalid characters; remove them.")
        return value

    return clean


def _layers_clean(value: list[int]) -> list[int]:
    if not value:
        raise ValueError("Pick at least one layer.")
    return sorted(set(value))


def _hooks_clean(value: list[str]) -> list[str]:
    if not value:
        raise ValueError(f"Pick at least one hook type ({', '.join(limits.HOOK_TYPES)}).")
    return [h for h in limits.HOOK_TYPES if h in value]


def _version_check(value: Any) -> int:
    if type(value) is not int or value != EXPORT_VERSION:
        raise ValueError(
            f"Unsupported export version; this miStudio reads version {EXPORT_VERSION} files."
        )
    return value


def _utc(value: datetime) -> datetime:
    try:
        return value.astimezone(UTC)
    except (OverflowError, ValueError):
        raise ValueError("is outside the dates this miStudio can store.") from None


Name = Annotated[
    str, AfterValidator(_text("Name", limits.NAME_MAX, required=True, multiline=False))
]
Description = Annotated[
    str,
    AfterValidator(_text("Description", limits.DESCRIPTION_MAX, required=False, multiline=True)),
]
LayerIndex = _number("A layer index", 0, limits.LAYER_INDEX_MAX)
HookType = Literal[limits.HOOK_TYPES]  # type: ignore[valid-type]
SpecialTokens = Literal[limits.SPECIAL_TOKENS]  # type: ignore[valid-type]
OutputFormat = Literal[limits.OUTPUT_FORMATS]  # type: ignore[valid-type]
Layers = Annotated[
    list[LayerIndex], Field(max_length=limits.LAYERS_PER_JOB_MAX), AfterValidator(_layers_clean)
]
HookTypes = Annotated[
    list[HookType], Field(max_length=len(limits.HOOK_TYPES)), AfterValidator(_hooks_clean)
]
Timestamp = Annotated[AwareDatetime, AfterValidator(_utc)]


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


# Full microseconds in every response: Django's JSON encoder would cut them to milliseconds, and
# an export must carry the exact timestamps.
StampOut = Annotated[datetime, PlainSerializer(_iso, return_type=str)]


class TemplateIn(Schema):
    """A template's settings. Extra keys are ignored (the save form posts the whole modal)."""

    name: Name
    description: Description = ""
    layers: Layers
    hook_types: HookTypes
    module_sites: ModuleSites = []  # absent in files exported before module paths existed
    max_samples: _number("Max samples", limits.MAX_SAMPLES_MIN, limits.MAX_SAMPLES_MAX) = (
        limits.DEFAULT_MAX_SAMPLES
    )
    batch_size: _number("Batch size", limits.BATCH_SIZE_MIN, limits.BATCH_SIZE_MAX) = (
        limits.DEFAULT_BATCH_SIZE
    )
    context_size: _number("Context size", limits.CONTEXT_SIZE_MIN, limits.CONTEXT_SIZE_MAX) = (
        limits.DEFAULT_CONTEXT_SIZE
    )
    top_k_examples: _number("Top-k examples", limits.TOP_K_MIN, limits.TOP_K_MAX) = (
        limits.DEFAULT_TOP_K
    )
    # Absent from files exported before it existed: those import with the default.
    special_tokens: SpecialTokens = limits.DEFAULT_SPECIAL_TOKENS
    # Absent from files exported before it existed: those import as safetensors only.
    output_format: OutputFormat = limits.DEFAULT_OUTPUT_FORMAT
    is_favorite: bool = False


def default_name(
    *, layers: list[int], hook_types: list[str], max_samples: int, at: datetime | None = None
) -> str:
    """The modal's auto-generated name: `{hooks}_layers{min}-{max}_{N}samples_{HHMM}`, or
    `{hooks}_layer{i}_{N}samples_{HHMM}` for one layer (server local time)."""
    hhmm = timezone.localtime(at or timezone.now()).strftime("%H%M")
    span = f"layer{layers[0]}" if len(layers) == 1 else f"layers{min(layers)}-{max(layers)}"
    return f"{'_'.join(hook_types)}_{span}_{max_samples}samples_{hhmm}"


class TemplateSaveIn(TemplateIn):
    """The modal's "Save Current Config": a blank name becomes the auto-generated one."""

    name: Annotated[
        str, AfterValidator(_text("Name", limits.NAME_MAX, required=False, multiline=False))
    ] = ""

    @model_validator(mode="after")
    def _name_or_default(self) -> TemplateSaveIn:
        if not self.name:
            self.name = default_name(
                layers=self.layers, hook_types=self.hook_types, max_samples=self.max_samples
            )
        return self


def form_fields(post: Any) -> dict:
    """A posted form (QueryDict) as TemplateIn input: the list fields as lists."""
    data = {key: post.get(key) for key in post}
    data.update(
        layers=post.getlist("layers"),
        hook_types=post.getlist("hook_types"),
        module_sites=module_sites_from_text(post.get("module_sites")),
    )
    return data


class TemplateImportItem(TemplateIn):
    """One item of an export file: the settings plus the identity that makes import lossless."""

    model_config = ConfigDict(extra="forbid")

    id: uuid.UUID | None = None
    created_at: Timestamp | None = None
    updated_at: Timestamp | None = None


class ImportFile(Schema):
    """The envelope of an export file. Items are checked one by one (`TemplateImportItem`) so a
    bad item is reported with its index instead of rejecting the whole file."""

    model_config = ConfigDict(extra="forbid")

    version: Annotated[int, BeforeValidator(_version_check)]
    exported_at: Timestamp | None = None
    extraction_templates: Annotated[list[Any], Field(max_length=IMPORT_MAX_TEMPLATES)]


class TemplateOut(Schema):
    id: uuid.UUID
    name: str
    description: str
    layers: list[int]
    hook_types: list[str]
    module_sites: list[dict]
    max_samples: int
    batch_size: int
    context_size: int
    top_k_examples: int
    special_tokens: str
    output_format: str
    is_favorite: bool
    created_at: StampOut
    updated_at: StampOut


class TemplateListOut(Schema):
    templates: list[TemplateOut]
    total: int
    limit: int
    offset: int


class FavoriteIn(Schema):
    is_favorite: bool


class FavoriteOut(Schema):
    id: uuid.UUID
    is_favorite: bool
    updated_at: StampOut


class ExportIn(Schema):
    """Optional body of POST /api/templates/export: the seed's include_* flags are accepted and
    ignored; `ids` narrows the export to those templates."""

    ids: Annotated[list[uuid.UUID], Field(max_length=IMPORT_MAX_TEMPLATES)] | None = None


class ExportOut(Schema):
    version: int
    exported_at: StampOut
    extraction_templates: list[TemplateOut]


class KindCount(Schema):
    extraction_templates: int


class ImportItemError(Schema):
    kind: str = "extraction_templates"
    index: int
    reason: str


class ImportOut(Schema):
    imported: KindCount
    skipped: KindCount
    errors: list[ImportItemError]


def errors_message(exc: PydanticValidationError, limit: int = 5) -> str:
    """One readable line from a pydantic error, with field labels and no input values."""
    parts = []
    for err in exc.errors(include_url=False, include_input=False, include_context=False)[:limit]:
        loc = [p for p in err.get("loc", ()) if p not in ("body", "payload")]
        label = LABELS.get(str(loc[0]), "A field") if loc else "Input"
        if err.get("type") == "extra_forbidden":
            parts.append("It holds a field this miStudio does not know; remove it.")
        elif err.get("type") == "value_error":
            message = str(err.get("msg", "invalid")).removeprefix("Value error, ")
            parts.append(message if message[:1].isupper() else f"{label} {message}")
        else:
            parts.append(f"{label}: {err.get('msg', 'invalid')}.")
    return " ".join(parts) or "Invalid input."
