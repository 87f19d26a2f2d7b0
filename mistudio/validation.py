"""Turn pydantic validation errors into one readable line, without echoing the input back
(the input may hold an access token)."""

from __future__ import annotations

from pydantic import ValidationError

FIELD_LABELS = {
    "hf_repo_id": "Repository",
    "quantization": "Quantization",
    "access_token": "Access token",
    "revision": "Revision",
    "dataset_id": "Dataset",
    "layers": "Layers",
    "hook_types": "Hook types",
    "batch_size": "Batch size",
    "max_samples": "Max samples",
    "context_size": "Context size",
}


def error_list(exc: ValidationError) -> list[dict]:
    """[{field, message}] with no input values."""
    out = []
    for err in exc.errors(include_url=False, include_input=False, include_context=False):
        field = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        message = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        out.append({"field": field, "message": message})
    return out


def validation_message(exc: ValidationError) -> str:
    parts = []
    for err in error_list(exc):
        label = FIELD_LABELS.get(err["field"], err["field"] or "Input")
        parts.append(f"{label}: {err['message']}")
    return " ".join(parts) or "Invalid input."
