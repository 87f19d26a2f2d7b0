"""The JSON API: one NinjaAPI, session + CSRF on every unsafe route, readable 4xx errors."""

from __future__ import annotations

from django.conf import settings
from ninja import NinjaAPI
from ninja.errors import AuthenticationError, HttpError
from ninja.errors import ValidationError as NinjaValidationError
from ninja.parser import Parser
from ninja.security import APIKeyCookie

from mistudio.errors import ServiceError
from mistudio.jsonparse import json_loads


class SiteAuth(APIKeyCookie):
    """Django's session with CSRF checks on unsafe methods; anonymous use allowed on loopback
    installs (login off), refused when MISTUDIO_LOGIN_REQUIRED is on."""

    param_name = settings.SESSION_COOKIE_NAME

    def authenticate(self, request, key):
        if request.user.is_authenticated:
            return request.user
        return None if settings.LOGIN_REQUIRED else "local"


class BoundedParser(Parser):
    """JSON bodies through mistudio.jsonparse (nesting and number guards); a refusal is
    django-ninja's 400 'Cannot parse request body'."""

    def parse_body(self, request):
        return json_loads(request.body)


api = NinjaAPI(
    parser=BoundedParser(),
    title="miStudio API",
    version="1",
    description="Model management, activation extraction and extraction templates.",
    auth=SiteAuth(),
    urls_namespace="api",
)


def _error(request, status: int, detail: str, code: str = "invalid", **extra):
    return api.create_response(request, {"detail": detail, "code": code, **extra}, status=status)


@api.exception_handler(ServiceError)
def _service_error(request, exc: ServiceError):
    return _error(request, exc.status, exc.message, exc.code)


@api.exception_handler(NinjaValidationError)
def _validation_error(request, exc: NinjaValidationError):
    errors = []
    for err in exc.errors:
        field = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body", "payload"))
        message = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        errors.append({"field": field, "message": message})
    detail = " ".join(f"{e['field'] or 'body'}: {e['message']}" for e in errors) or "Invalid input."
    return _error(request, 422, detail, "invalid", errors=errors)


@api.exception_handler(AuthenticationError)
def _auth_error(request, exc):
    return _error(request, 401, "Sign in first.", "unauthenticated")


@api.exception_handler(HttpError)
def _http_error(request, exc: HttpError):
    return _error(request, exc.status_code, str(exc), "http")


api.add_router("/models", "models_app.api.router")
api.add_router("/datasets", "datasets_app.api.router")
api.add_router("/extractions", "models_app.api.extractions_router")
api.add_router("/templates", "templates_app.api.router")
