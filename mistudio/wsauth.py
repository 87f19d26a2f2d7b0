"""Websocket gates: the login gate (the counterpart of LoginRequiredWhenEnabled for HTTP) and
the same-origin check, which compares scheme, host AND port."""

from __future__ import annotations

from urllib.parse import urlsplit

from channels.security.websocket import WebsocketDenier
from django.conf import settings
from django.http.request import validate_host

DEFAULT_PORTS = {"http": 80, "https": 443}


def origin_tuple(origin: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of an Origin or a trusted-origin setting; None when it is none."""
    try:
        parts = urlsplit(origin.strip())
        port = parts.port or DEFAULT_PORTS.get(parts.scheme)
    except ValueError:
        return None
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname or port is None:
        return None
    if parts.path not in ("", "/") or parts.query or parts.username or parts.password:
        return None
    return parts.scheme, parts.hostname.lower(), port


def _headers(scope) -> dict[bytes, bytes]:
    return {k.lower(): v for k, v in scope.get("headers", [])}


def own_origin(scope) -> tuple[str, str, int] | None:
    """The origin the page that opened this socket must have: the socket's own scheme (wss →
    https, or the proxy's X-Forwarded-Proto when MISTUDIO_HTTPS trusts it) and its Host
    header, which must be an allowed host."""
    headers = _headers(scope)
    host = headers.get(b"host", b"").decode("latin-1")
    scheme = "https" if scope.get("scheme") in ("wss", "https") else "http"
    if getattr(settings, "SECURE_PROXY_SSL_HEADER", None):
        forwarded = headers.get(b"x-forwarded-proto", b"").decode("latin-1").strip().lower()
        scheme = "https" if forwarded == "https" else scheme
    found = origin_tuple(f"{scheme}://{host}") if host else None
    if found is None or not validate_host(found[1], settings.ALLOWED_HOSTS):
        return None
    return found


def origin_allowed(scope) -> bool:
    """True when the Origin header equals the socket's own origin or a CSRF_TRUSTED_ORIGINS
    entry in scheme, host and port (a missing or malformed Origin is refused)."""
    raw = _headers(scope).get(b"origin")
    origin = origin_tuple(raw.decode("latin-1")) if raw else None
    if origin is None:
        return False
    trusted = {origin_tuple(o) for o in settings.CSRF_TRUSTED_ORIGINS} - {None}
    return origin == own_origin(scope) or origin in trusted


class SameOriginWebsocket:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "websocket" and not origin_allowed(scope):
            return await WebsocketDenier()(scope, receive, send)
        return await self.app(scope, receive, send)


class LoginRequiredWebsocket:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        user = scope.get("user")
        if settings.LOGIN_REQUIRED and not (user and user.is_authenticated):
            denier = WebsocketDenier()
            return await denier(scope, receive, send)
        return await self.app(scope, receive, send)
