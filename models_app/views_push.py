"""HTML view for Push to Hub: the inline form on a completed extraction posts here."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_POST
from pydantic import ValidationError

from mistudio.errors import ServiceError
from mistudio.validation import validation_message

from . import share
from .schemas import PushIn

PUSH = "models_app/push.html"


def _refused(request: HttpRequest, extraction_id: str, message: str, status: int) -> HttpResponse:
    """The refusal under the form (never echoing the token), the push state left as it is."""
    if not request.htmx:
        return HttpResponse(message, status=status, content_type="text/plain")
    response = render(
        request, "models_app/models.html#form_error", {"error": message}, status=status
    )
    response["HX-Retarget"] = f"#push-error-{extraction_id}"
    response["HX-Reswap"] = "innerHTML"
    return response


@require_POST
def extraction_push(request: HttpRequest, extraction_id: str) -> HttpResponse:
    """Queue a push of the extraction; answers the push's state (202) for the row."""
    post = request.POST
    try:
        data = PushIn.model_validate(
            {"repo_id": post.get("repo_id", ""), "token": post.get("token") or None,
             "private": post.get("private") == "1"}
        )  # fmt: skip
        push = share.extraction_push(extraction_id, **data.model_dump())
    except ValidationError as exc:
        return _refused(request, extraction_id, validation_message(exc), 422)
    except ServiceError as exc:
        return _refused(request, extraction_id, exc.message, exc.status)
    if not request.htmx:
        return redirect("models:extractions", model_id=push.extraction.model_id)
    context = {"push": push, "xid": extraction_id}
    return render(request, f"{PUSH}#push_status", context, status=202)
