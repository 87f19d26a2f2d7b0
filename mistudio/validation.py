"""Validators every app's request schemas share (repo ids, revisions, access tokens) and one
readable line from pydantic errors, without echoing the input back (it may hold a token)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Annotated, Literal

from ninja.errors import ValidationError as NinjaValidationError
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from mistudio import limits
from mistudio.errors import Invalid
from mistudio.hub import HubError, repo_id_clean, revision_clean
from mistudio.jsonparse import JSONRefused, json_loads

TOKEN_MAX = 500

FIELD_LABELS = {
    "hf_repo_id": "Repository",
    "hf_dataset_id": "Dataset repository",
    "quantization": "Quantization",
    "access_token": "Access token",
    "revision": "Revision",
    "dataset_id": "Dataset",
    "layers": "Layers",
    "hook_types": "Hook types",
    "module_sites": "Module paths",
    "path": "Module path",
    "io": "Input or output",
    "batch_size": "Batch size",
    "max_samples": "Max samples",
    "context_size": "Context size",
    "output_format": "Output format",
    "name": "Name",
    "file": "File",
    "text_field": "Text field",
    "split": "Split",
}


def _hub_checked(fn: Callable[[object], str]) -> Callable[[object], str]:
    """A Hub id check as a pydantic validator (HubError → ValueError with its message)."""

    def check(value):
        try:
            return fn(value)
        except HubError as exc:
            raise ValueError(exc.message) from None

    return check


def _token_clean(value: str | None) -> str | None:
    value = (value or "").strip()
    if not value:
        return None
    if not value.isascii() or not value.isprintable() or " " in value:
        raise ValueError("An access token is one word of printable ASCII characters.")
    return value


def _dataset_repo_id(value: object) -> str:
    return repo_id_clean(value, kind="dataset")


RepoId = Annotated[str, Field(max_length=400), AfterValidator(_hub_checked(repo_id_clean))]
DatasetRepoId = Annotated[
    str, Field(max_length=400), AfterValidator(_hub_checked(_dataset_repo_id))
]
Revision = Annotated[
    str | None, Field(max_length=200), AfterValidator(_hub_checked(revision_clean))
]
AccessToken = Annotated[str | None, Field(max_length=TOKEN_MAX), AfterValidator(_token_clean)]


def error_list(exc: ValidationError) -> list[dict]:
    """[{field, message}] with no input values."""
    out = []
    for err in exc.errors(include_url=False, include_input=False, include_context=False):
        field = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        message = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        out.append({"field": field, "message": message})
    return out


def json_object(body: bytes, *, optional: bool = False, hint: str = "") -> dict:
    """A request body parsed as a JSON object ({} for an empty optional body) by the one JSON
    path (mistudio.jsonparse: nesting and number guards); a 400 Invalid otherwise (the body is
    not one the route reads), saying why when the JSON itself was refused. `hint`: what the route
    takes, for the message."""
    if optional and not body.strip():
        return {}
    why = ""
    try:
        data = json_loads(body)
    except ValueError as exc:
        data, why = None, f" (refused: {exc})" if isinstance(exc, JSONRefused) else ""
    if not isinstance(data, dict):
        raise Invalid(
            f"Send {hint or 'a JSON object'} as the request body{why}.", code="bad_json", status=400
        )
    return data


def validated(schema: type[BaseModel], data: dict, *, where: str = "body"):
    """`schema` validated from `data` for an API route; a refusal becomes django-ninja's
    ValidationError (the API's 422 with each field's message), without echoing the input."""
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        errors = [{"loc": (where, e["field"]), "msg": e["message"]} for e in error_list(exc)]
        raise NinjaValidationError(errors) from None


def validation_message(exc: ValidationError) -> str:
    """'Label: message' for each bad field, on one line."""
    parts = []
    for err in error_list(exc):
        label = FIELD_LABELS.get(err["field"], err["field"] or "Input")
        parts.append(f"{label}: {err['message']}")
    return " ".join(parts) or "Invalid input."


def _module_path_clean(value: str) -> str:
    value = value.strip()
    if not _MODULE_PATH_RE.fullmatch(value):
        raise ValueError(
            "is a dotted module path of the model, e.g. model.layers.3.mlp.down_proj "
            "(letters, digits, _ and dots)."
        )
    return value


_MODULE_PATH_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*")


class ModuleSite(BaseModel):
    """An advanced capture site: a module path of the model, read at its input or output. The
    path's existence and shape are checked against the model by the extraction service."""

    model_config = ConfigDict(extra="forbid")

    path: Annotated[
        str,
        Field(min_length=1, max_length=limits.MODULE_PATH_MAX),
        AfterValidator(_module_path_clean),
    ]
    io: Literal[limits.MODULE_IO] = "output"  # type: ignore[valid-type]


def _module_sites_clean(value: list[ModuleSite]) -> list[ModuleSite]:
    seen: dict[tuple[str, str], ModuleSite] = {}
    for site in value:
        seen.setdefault((site.path, site.io), site)
    return list(seen.values())


ModuleSites = Annotated[
    list[ModuleSite],
    Field(max_length=limits.MODULE_SITES_MAX),
    AfterValidator(_module_sites_clean),
]


def module_sites_from_text(text: str | None) -> list[dict]:
    """The modal's module-path field, one site a line: `PATH` (its output) or `PATH input` /
    `PATH output`; blank lines are skipped. Validation is ModuleSite's."""
    sites = []
    for line in (text or "").splitlines():
        path, *rest = line.split() or [""]
        if path:
            sites.append({"path": path, "io": " ".join(rest) or "output"})
    return sites


def module_sites_text(sites: list[dict]) -> str:
    """Inverse of module_sites_from_text."""
    return "\n".join(f"{site['path']} {site['io']}" for site in sites)
