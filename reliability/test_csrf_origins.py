"""Nobody let in: every unsafe route (found from the URL resolver and the API schema, so a new
route is covered without editing this file) refuses a request without a CSRF token, the
websockets refuse a foreign or missing Origin, serving beyond loopback without login is refused
at start-up, and with login on every page but the login page sends anonymous users to it."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.conf import settings as django_settings
from django.contrib.auth import get_user_model
from django.core.management import CommandError, call_command
from django.test import Client
from django.urls import URLPattern, URLResolver, get_resolver
from django.urls.resolvers import RoutePattern

from mistudio.api import api
from mistudio.asgi import application
from mistudio.routing import websocket_urlpatterns
from mistudio.testing.live import ROOT
from models_app.models import Model

from .conftest import FIGURES

pytestmark = pytest.mark.django_db(transaction=True)

UNSAFE = ("POST", "PUT", "PATCH", "DELETE")
CONVERTER = re.compile(r"<(?:(\w+):)?\w+>")
SAMPLE = {"int": "1", "path": "x/y"}
LOGIN_PAGE = "/admin/login/"


def _concrete(route: str) -> str:
    return CONVERTER.sub(lambda m: SAMPLE.get(m.group(1) or "str", "x1"), route)


def _walk(patterns, prefix: str = "") -> list[str]:
    """A concrete path for every URL pattern (regex patterns, only admin's app index, are
    skipped: they take one of a fixed list of app labels, covered by its other routes)."""
    paths = []
    for p in patterns:
        if not isinstance(p.pattern, RoutePattern):
            continue
        route = prefix + _concrete(str(p.pattern))
        if isinstance(p, URLResolver):
            paths += _walk(p.url_patterns, route)
        elif isinstance(p, URLPattern):
            paths.append("/" + route)
    return sorted(set(paths))


def site_paths() -> list[str]:
    """Every page and form route outside the JSON API."""
    return [p for p in _walk(get_resolver().url_patterns) if not p.startswith("/api/")]


def api_operations() -> list[tuple[str, str]]:
    """(method, path) of every unsafe JSON API operation, ids filled in."""
    paths = api.get_openapi_schema()["paths"]
    return [
        (method.upper(), _concrete(path.replace("{", "<").replace("}", ">")))
        for path, ops in paths.items()
        for method in ops
        if method.upper() in UNSAFE
    ]


def unsafe_requests() -> list[tuple[str, str]]:
    site = [(method, path) for path in site_paths() for method in UNSAFE]
    return site + api_operations()


def test_every_unsafe_route_without_a_csrf_token_is_refused(hub):
    strict = Client(enforce_csrf_checks=True)
    refused = {}
    for method, path in unsafe_requests():
        body = '{"hf_repo_id": "tiny/llama"}'
        refused[(method, path)] = strict.generic(method, path, body, "application/json")
    # 405: the route does not take that method at all (the upload form checks the body's size
    # before its CSRF token, so its view answers a PUT itself)
    wrong = {k: r.status_code for k, r in refused.items() if r.status_code not in (403, 405)}
    assert not wrong and not Model.objects.exists()
    by_path = {path for (method, path), r in refused.items() if r.status_code == 403}
    assert by_path == {path for _, path in refused}, "each route refuses some unsafe method"
    assert ("POST", "/api/models/download") in refused and ("POST", "/models/download") in refused
    FIGURES["unsafe requests without a CSRF token, all refused (403, or 405)"] += len(refused)


async def _ws_accepted(
    path: str, origin: bytes | None, host: bytes = b"127.0.0.1:8000", scheme: str = "ws",
    cookie: bytes | None = None,
) -> bool:  # fmt: skip
    headers = [(b"host", host), *([(b"origin", origin)] if origin else [])]
    headers += [(b"cookie", cookie)] if cookie else []
    comm = WebsocketCommunicator(application, path, headers=headers)
    comm.scope["scheme"] = scheme
    connected, _ = await comm.connect()
    await comm.disconnect()
    return connected


@pytest.mark.asyncio
async def test_every_websocket_refuses_a_foreign_or_missing_origin():
    for route in websocket_urlpatterns:
        path = "/" + str(route.pattern)
        assert await _ws_accepted(path, b"http://127.0.0.1:8000"), path  # the control
        assert not await _ws_accepted(path, b"http://evil.example"), path
        assert not await _ws_accepted(path, b"http://127.0.0.1.evil.example"), path
        assert not await _ws_accepted(path, None), path


FOREIGN_ORIGINS = [
    b"http://127.0.0.1:9999",  # the port differs (issue 13)
    b"http://127.0.0.1",  # port 80, not 8000
    b"https://127.0.0.1:8000",  # the scheme differs
    b"http://localhost:8000",  # another allowed host, but not this page's
    b"http://127.0.0.1:8000/path",  # not an origin
    b"http://user@127.0.0.1:8000",
    b"null",
    b"http://127.0.0.1:80000",
]


@pytest.mark.asyncio
@pytest.mark.parametrize("origin", FOREIGN_ORIGINS)
async def test_the_websocket_origin_must_match_in_scheme_host_and_port(origin):
    for route in websocket_urlpatterns:
        path = "/" + str(route.pattern)
        assert not await _ws_accepted(path, origin), (path, origin)
    FIGURES["foreign websocket origins tried, all refused"] += 1


@pytest.mark.asyncio
async def test_secure_sockets_and_trusted_origins_match_exactly(settings):
    path = "/" + str(websocket_urlpatterns[0].pattern)
    assert await _ws_accepted(path, b"https://127.0.0.1:8443", b"127.0.0.1:8443", "wss")
    assert await _ws_accepted(path, b"https://127.0.0.1", b"127.0.0.1", "wss")  # 443 both
    assert not await _ws_accepted(path, b"http://127.0.0.1:8443", b"127.0.0.1:8443", "wss")
    assert not await _ws_accepted(path, b"http://evil.example:8000", b"evil.example:8000")
    settings.CSRF_TRUSTED_ORIGINS = ["https://lab.example.org"]
    assert await _ws_accepted(path, b"https://lab.example.org")
    assert await _ws_accepted(path, b"https://lab.example.org:443")
    assert not await _ws_accepted(path, b"https://lab.example.org:8443")
    assert not await _ws_accepted(path, b"http://lab.example.org")


@pytest.mark.asyncio
async def test_with_login_a_signed_in_user_on_a_foreign_port_is_refused(settings):
    settings.LOGIN_REQUIRED = True
    cookie = await sync_to_async(_session_cookie)()
    for route in websocket_urlpatterns:
        path = "/" + str(route.pattern)
        assert await _ws_accepted(path, b"http://127.0.0.1:8000", cookie=cookie), path
        assert not await _ws_accepted(path, b"http://127.0.0.1:9999", cookie=cookie), path


def _session_cookie() -> bytes:
    user = get_user_model().objects.create_user("ws-user", password="pw-123456789")
    client = Client()
    client.force_login(user)
    name = django_settings.SESSION_COOKIE_NAME
    return f"{name}={client.cookies[name].value}".encode()


def _manage(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_serving_beyond_loopback_without_login_is_refused_at_start_up(settings, tmp_path):
    settings.LOGIN_REQUIRED = False
    with pytest.raises(CommandError, match="without login"):
        call_command("serve", host="0.0.0.0")
    env = {"MISTUDIO_DATA_DIR": str(tmp_path), "MISTUDIO_LOGIN_REQUIRED": "0"}
    served = _manage("serve", "--host", "0.0.0.0", "--port", "1", **env)
    assert served.returncode != 0 and "without login" in served.stderr, served.stderr[-2000:]
    worker = _manage("qcluster", **env, MISTUDIO_HOST="0.0.0.0")  # a cluster runs the checks
    assert worker.returncode != 0 and "mistudio.E001" in worker.stderr, worker.stderr[-2000:]
    proxied = _manage("check", **env, DJANGO_ALLOWED_HOSTS="mistudio.example.org")
    assert proxied.returncode != 0 and "mistudio.E002" in proxied.stderr
    with_login = _manage("check", **{**env, "MISTUDIO_LOGIN_REQUIRED": "1"}, MISTUDIO_HOST="::")
    assert with_login.returncode == 0, with_login.stderr


def test_with_login_every_page_but_login_redirects_anonymous_users(settings):
    settings.LOGIN_REQUIRED = True
    anonymous = Client()
    assert anonymous.get(LOGIN_PAGE).status_code == 200
    pages = [p for p in site_paths() if p != LOGIN_PAGE]
    for path in pages:
        r = anonymous.get(path)
        assert r.status_code == 302 and r["Location"].startswith(LOGIN_PAGE), (path, r)
    for path in ("/api/models", "/api/datasets", "/api/templates/extraction", "/api/docs"):
        assert anonymous.get(path).status_code == 401, path
    FIGURES["pages checked for the login redirect"] += len(pages)


@pytest.mark.asyncio
async def test_with_login_an_anonymous_websocket_is_refused(settings):
    settings.LOGIN_REQUIRED = True
    for route in websocket_urlpatterns:
        assert not await _ws_accepted("/" + str(route.pattern), b"http://127.0.0.1:8000")
