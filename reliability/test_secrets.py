"""A canary access token sent through downloads that succeed, are refused (gated, invalid),
fail in the worker and are cancelled: it reaches the Hub, and never appears in any table (django-q2
task and queue payloads decoded), any log, any HTTP response or any websocket frame."""

from __future__ import annotations

import contextlib
import threading

import pytest
import websocket
from django.conf import settings
from django.db import connection
from django_q.models import OrmQ, Task

from .conftest import FIGURES
from .helpers import MODEL_TERMINAL, LiveClient, config_precache, wait_model

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

REPO = "tiny/gated-llama"


class FrameLog(threading.Thread):
    """A real websocket client on the live progress socket, keeping every frame it receives."""

    def __init__(self, live):
        super().__init__(daemon=True)
        url = live.url.replace("http://", "ws://") + "/ws/models/"
        self.ws = websocket.create_connection(url, origin=live.url, timeout=120)
        self.frames: list[str] = []

    def run(self) -> None:
        try:
            while True:
                self.frames.append(self.ws.recv())
        except (websocket.WebSocketException, OSError):
            return

    def close(self) -> list[str]:
        self.ws.close()
        self.join(timeout=10)
        return self.frames


def _download(web: LiveClient, quantization: str, token: str):
    body = {"hf_repo_id": REPO, "quantization": quantization, "access_token": token}
    return web.send("POST", "/api/models/download", body)


def _succeeds(web: LiveClient, token: str) -> None:
    r = _download(web, "FP16", token)
    assert r.status_code == 201, r.text
    assert wait_model(r.json()["id"], MODEL_TERMINAL).status == "ready"
    # deleted, so the next downloads fetch the files again instead of finding them cached
    assert web.send("DELETE", f"/api/models/{r.json()['id']}").status_code == 204


def _refused(web: LiveClient, tokens: dict) -> None:
    assert _download(web, "Q4", tokens["unapproved"]).status_code == 403  # gated
    assert _download(web, "Q4", tokens["invalid"]).status_code == 401
    form = {"hf_repo_id": REPO, "quantization": "Q4", "access_token": tokens["invalid"]}
    headers = {"X-CSRFToken": web.csrf, "HX-Request": "true"}
    for path in ("/models/estimate", "/models/download"):  # the page's own forms
        web.responses.append(web.http.post(path, data=form, headers=headers))


def _fails_in_the_worker(web: LiveClient, hub, token: str) -> str:
    """The token is revoked while the job waits for its first byte: the worker's next request
    is refused and the job ends in error."""
    config_precache(hub, REPO, token)
    hub.pause(after_bytes=0)
    r = _download(web, "Q8", token)
    assert hub.wait_until_held(1, timeout=300)
    hub.tokens.discard(token)
    hub.resume()
    row = wait_model(r.json()["id"], MODEL_TERMINAL)
    assert row.status == "error" and "token is invalid" in row.error_message
    hub.tokens.add(token)
    return row.pk


def _cancelled(web: LiveClient, hub, token: str) -> None:
    hub.pause(after_bytes=256 * 1024)
    r = _download(web, "Q2", token)
    assert hub.wait_until_held(1, timeout=300)
    assert web.send("POST", f"/api/models/{r.json()['id']}/cancel").status_code == 200
    hub.resume()
    assert wait_model(r.json()["id"], MODEL_TERMINAL).status == "cancelled"


def _pages(web: LiveClient) -> None:
    for path in ("/models/", "/api/models", "/datasets/", "/api/openapi.json"):
        web.get(path)
    for row in web.get("/api/models").json():
        web.get(f"/api/models/{row['id']}")
        web.get(f"/models/{row['id']}/card")


def table_dump() -> str:
    """Every row of every table, plus django-q2's pickled payloads decoded through the ORM."""
    parts = []
    with connection.cursor() as cur:
        for table in connection.introspection.table_names():
            cur.execute(f'SELECT * FROM "{table}"')  # noqa: S608 - test-only table dump
            parts.append(repr(cur.fetchall()))
    parts += [repr(q.task) for q in OrmQ.objects.all()]
    parts += [repr((t.args, t.kwargs, t.result)) for t in Task.objects.all()]
    return "\n".join(parts)


def redis_dump() -> str:
    """Every key of the Redis DB the broker and channel layer use (empty without REDIS_URL)."""
    if not settings.REDIS_URL:
        return ""
    import redis
    from django_q.signing import SignedPackage

    r = redis.from_url(settings.REDIS_URL)
    read = {
        "string": lambda k: [r.get(k)],
        "list": lambda k: r.lrange(k, 0, -1),
        "set": r.smembers,
        "zset": lambda k: r.zrange(k, 0, -1),
        "hash": lambda k: [*r.hgetall(k).keys(), *r.hgetall(k).values()],
    }
    parts = []
    for key in r.scan_iter():
        parts.append(repr(key))
        for value in read.get(r.type(key).decode(), lambda k: [r.dump(k)])(key):
            parts.append(repr(value))
            with contextlib.suppress(Exception):  # not every value is a task payload
                parts.append(repr(SignedPackage.loads(value)))
    return "\n".join(parts)


def _hits(token: str, places: dict[str, str]) -> list[str]:
    return [name for name, text in places.items() if token in text]


def test_a_canary_token_never_leaks(live, hub, canary, caplog):
    web = LiveClient(live.url)
    frames = FrameLog(live)
    frames.start()
    _refused(web, canary)  # first: with the files cached, the Hub is not asked again
    _succeeds(web, canary["approved"])
    failed = _fails_in_the_worker(web, hub, canary["approved"])
    _cancelled(web, hub, canary["approved"])
    _pages(web)
    assert any(r.token_used == canary["approved"] for r in hub.requests)  # it was really used
    places = {
        "tables": table_dump(),
        "redis": redis_dump(),
        "logs": "\n".join(p.read_text() for p in live.log_dir.glob("*.log")) + caplog.text,
        "responses": "\n".join(f"{r.headers}\n{r.text}" for r in web.responses),
        "frames": "\n".join(frames.close()),
    }
    # the places were really watched: they show the job that failed in the worker
    assert all(failed in places[p] for p in ("tables", "logs", "responses", "frames")), failed
    assert len(web.responses) > 10
    hits = [hit for token in canary.values() for hit in _hits(token, places)]
    FIGURES["canary token hits (tables, Redis, logs, HTTP, websocket)"] += len(hits)
    FIGURES["canary download flows (success, gated, invalid, worker failure, cancel)"] += 5
    assert hits == []
    web.close()
