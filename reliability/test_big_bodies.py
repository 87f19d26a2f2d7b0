"""Oversize and anonymous request bodies against the real web server (mistudio.webserver): the
answer comes from the headers, before the body is sent, on every unsafe route; chunked bodies
are cut off once they pass the limit; an accepted upload still arrives whole. Memory is
measured in benchmarks/hostile_input.py, not here."""

from __future__ import annotations

import json
import socket

import httpx
import pytest

from mistudio.testing.live import LiveStack
from mistudio.testing.queues import queues_purge

from .conftest import FIGURES
from .test_csrf_origins import unsafe_requests

pytestmark = pytest.mark.django_db(transaction=True)

GB = 1024**3


def _stack(hub, **env):
    queues_purge()
    return LiveStack(hub.endpoint, extra_env={"MISTUDIO_REQUEST_MAX_MB": "1", **env},
                     clusters=False)  # fmt: skip


@pytest.fixture
def web(hub, transactional_db):
    with _stack(hub) as stack:
        yield stack


@pytest.fixture
def web_login(hub, transactional_db):
    with _stack(hub, MISTUDIO_LOGIN_REQUIRED="1") as stack:
        yield stack


def raw(stack: LiveStack, head: str, body_parts=(), *, headers: dict | None = None) -> tuple:
    """Send a request's head (and body parts until the server hangs up); return (status, json
    or None). The read has a generous deadline: the answer must not wait for a body."""
    lines = [head, "Host: 127.0.0.1", *(f"{k}: {v}" for k, v in (headers or {}).items())]
    with socket.create_connection(("127.0.0.1", stack.port), timeout=120) as s:
        s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        for part in body_parts:
            try:
                s.sendall(part)
            except OSError:
                break  # the server answered and closed: the rest is never read
        data = b""
        while b"\r\n\r\n" not in data or len(data) < _length(data):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    status = int(data.split(b" ", 2)[1])
    body = data.split(b"\r\n\r\n", 1)[1]
    try:
        return status, json.loads(body)
    except ValueError:
        return status, None


def _length(data: bytes) -> int:
    head, _, _ = data.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(head) + 4 + int(line.split(b":")[1])
    return 0


@pytest.mark.parametrize("size", [2049 * 1024**2, 3 * GB, 10**15])
def test_an_oversize_upload_is_refused_from_its_headers(web, size):
    status, body = raw(web, "POST /api/datasets HTTP/1.1", headers={
        "Content-Type": "multipart/form-data; boundary=x", "Content-Length": str(size),
    })  # fmt: skip
    assert status == 413 and body["code"] == "too_large"
    assert "MISTUDIO_DATASET_UPLOAD_MAX_MB" in body["detail"]
    FIGURES["oversize bodies refused at the headers"] += 1


def test_every_unsafe_route_refuses_an_oversize_body_from_its_headers(web):
    routes = unsafe_requests()
    for method, path in routes:
        status, body = raw(web, f"{method} {path} HTTP/1.1", headers={
            "Content-Type": "application/json", "Content-Length": str(3 * GB),
        })  # fmt: skip
        assert status == 413 and body["code"] == "too_large", (method, path, status)
    FIGURES["oversize bodies refused at the headers"] += len(routes)


def test_a_chunked_body_is_cut_off_once_it_passes_the_limit(web):
    piece = b"%x\r\n%s\r\n" % (256 * 1024, b"[" * 256 * 1024)
    for path in ("/api/models/download", "/api/templates/import", "/models/estimate"):
        status, body = raw(web, f"POST {path} HTTP/1.1", [piece] * 64, headers={
            "Content-Type": "application/json", "Transfer-Encoding": "chunked",
        })  # fmt: skip
        assert status == 413 and "limit" in body["detail"], (path, status)
    FIGURES["oversize bodies refused at the headers"] += 3


def test_with_login_an_anonymous_body_is_refused_from_its_headers(web_login):
    tried = 0
    for path in ("/api/datasets", "/datasets/upload", "/api/models/download", "/models/estimate"):
        for size in (450 * 1024**2, 300 * 1024**2, 100 * 1024):
            status, body = raw(web_login, f"POST {path} HTTP/1.1", headers={
                "Content-Type": "multipart/form-data; boundary=x", "Content-Length": str(size),
            })  # fmt: skip
            over_route_limit = "datasets" not in path and size > 1024**2
            assert status == (413 if over_route_limit else 401), (path, size, status)
            tried += 1
    status, _ = raw(web_login, "POST /api/datasets HTTP/1.1", headers={
        "Content-Type": "multipart/form-data; boundary=x", "Transfer-Encoding": "chunked",
    })  # fmt: skip
    assert status == 401
    FIGURES["anonymous bodies refused at the headers"] += tried + 1


def test_an_accepted_upload_arrives_whole(web, settings):
    text = b"".join(b"line %d of a streamed upload\n" % i for i in range(200_000))  # ~5.6 MB
    head = (
        b'--b\r\nContent-Disposition: form-data; name="file"; filename="s.txt"\r\n'
        b"Content-Type: text/plain\r\n\r\n"
    )
    body = head + text + b"\r\n--b--\r\n"
    token = httpx.get(web.url + "/datasets/").cookies["csrftoken"]
    status, answer = raw(web, "POST /api/datasets HTTP/1.1", [body], headers={
        "Content-Type": "multipart/form-data; boundary=b", "Content-Length": str(len(body)),
        "Cookie": f"csrftoken={token}", "X-CSRFToken": token,
    })  # fmt: skip
    assert status == 202 and answer["status"] == "queued", answer  # a worker normalizes it
    assert answer["bytes_total"] == len(text)
    stored = settings.DATASETS_DIR / answer["id"] / "upload.txt"
    assert stored.read_bytes() == text  # whole, byte for byte
