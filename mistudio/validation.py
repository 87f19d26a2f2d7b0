"""Validators every app's request schemas share (repo ids, revisions, access tokens) and one
readable line from pydantic errors, without echoing the input back (it may hold a token)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from ninja.errors import ValidationError as NinjaValidationError
from pydantic import AfterValidator, BaseModel, Field, ValidationError

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
    "batch_size": "Batch size",
    "max_samples": "Max samples",
    "context_size": "Context size",
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
    path (mistudio.jsonparse: nesting and number guards); Invalid (422) otherwise, saying why
    when the JSON itself was refused. `hint`: what the route takes, for the message."""
    if optional and not body.strip():
        return {}
    why = ""
    try:
        data = json_loads(body)
    except ValueError as exc:
        data, why = None, f" (refused: {exc})" if isinstance(exc, JSONRefused) else ""
    if not isinstance(data, dict):
        raise Invalid(f"Send {hint or 'a JSON object'} as the request body{why}.", code="bad_json")
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
