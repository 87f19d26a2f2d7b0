"""A canary access token sent through downloads that succeed, are refused (gated, invalid),
fail in the worker and are cancelled, and through pushes of an extraction to a dataset repo: it
reaches the Hub, and never appears in any table (django-q2 task and queue payloads decoded), any
log, any HTTP response, any websocket frame or (pushes) any file under the data dir."""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path

import pytest
import websocket
from django.conf import settings
from django.db import connection
from django_q.models import OrmQ, Task

from models_app.models import ExtractionJob, PushJob
from models_app.tests.helpers import text_dataset, wait_for

from .conftest import FIGURES
from .helpers import (
    DEADLINE_S,
    EXTRACTION_TERMINAL,
    MODEL_TERMINAL,
    LiveClient,
    config_precache,
    download_ready,
    wait_extraction,
    wait_model,
)

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


def _completed_extraction(web: LiveClient) -> str:
    model = download_ready(web, "tiny/gpt2", "FP16")
    body = {"dataset_id": text_dataset("secrets").pk, "layers": [0], "hook_types": ["residual"],
            "batch_size": 4, "max_samples": 8, "context_size": 16}  # fmt: skip
    r = web.send("POST", f"/api/models/{model.pk}/extract-activations", body)
    assert r.status_code == 202, r.text
    job = wait_extraction(r.json()["extraction_id"], EXTRACTION_TERMINAL)
    assert job.status == "completed", job.error_message
    return job.pk


def _push(web: LiveClient, extraction_id: str, repo_id: str, token: str) -> PushJob:
    r = web.send(
        "POST", f"/api/extractions/{extraction_id}/push", {"repo_id": repo_id, "token": token}
    )
    assert r.status_code == 202, r.text
    push = wait_for(
        lambda: PushJob.objects.filter(
            pk=r.json()["id"], status__in=("completed", "failed")
        ).first(),
        timeout=DEADLINE_S,
    )
    web.get(f"/api/extractions/{extraction_id}/pushes/{push.pk}")
    return push


def _files_text(*roots) -> str:
    """Every file under `roots` (data dir, HF cache), as bytes decoded leniently."""
    return "\n".join(
        p.read_bytes().decode("latin-1")
        for root in roots
        for p in Path(root).rglob("*")
        if p.is_file()
    )


def test_a_canary_token_never_leaks_from_a_push(live, hub, canary, caplog):
    """Pushes that succeed (API and page form), are refused by the Hub (invalid, read-only,
    foreign namespace) or by validation: the token reaches the Hub and stays nowhere."""
    hub.write_tokens.add(canary["approved"])
    web = LiveClient(live.url)
    frames = FrameLog(live)
    frames.start()
    xid = _completed_extraction(web)
    assert _push(web, xid, "tester/canary", canary["approved"]).status == "completed"
    assert _push(web, xid, "tester/canary", canary["invalid"]).status == "failed"
    assert _push(web, xid, "tester/canary", canary["unapproved"]).status == "failed"
    failed = _push(web, xid, "someone-else/canary", canary["approved"])
    assert failed.status == "failed" and "(403)" in failed.error_message
    bad = {"repo_id": "no owner", "token": canary["approved"]}
    assert web.send("POST", f"/api/extractions/{xid}/push", bad).status_code == 422
    form = {"repo_id": "tester/canary-form", "token": canary["approved"], "private": "1"}
    headers = {"X-CSRFToken": web.csrf, "HX-Request": "true"}
    web.responses.append(
        web.http.post(f"/models/extractions/{xid}/push", data=form, headers=headers)
    )
    assert web.responses[-1].status_code == 202, web.responses[-1].text
    wait_for(lambda: not PushJob.objects.filter(status__in=("queued", "running")).exists(),
             timeout=DEADLINE_S)  # fmt: skip
    web.get(f"/models/{ExtractionJob.objects.get(pk=xid).model_id}/extractions")
    uploads = [r for r in hub.requests if r.path.endswith("/commit/main") and "canary" in r.path]
    assert [r.token_used for r in uploads] == [canary["approved"]] * 2  # really used, twice
    places = {
        "tables": table_dump(),
        "redis": redis_dump(),
        "logs": "\n".join(p.read_text() for p in live.log_dir.glob("*.log")) + caplog.text,
        "responses": "\n".join(f"{r.headers}\n{r.text}" for r in web.responses),
        "frames": "\n".join(frames.close()),
        "files": _files_text(settings.DATA_DIR, settings.MODELS_CACHE_DIR),
    }
    # the places were really watched: they show the push that failed in the worker, and the
    # files the extraction that was pushed (its manifest names it)
    assert all(failed.pk in places[p] for p in ("tables", "logs", "responses", "frames")), failed
    assert xid in places["files"]
    hits = [hit for token in canary.values() for hit in _hits(token, places)]
    FIGURES["canary token hits in push flows (tables, Redis, logs, HTTP, websocket, files)"] += len(
        hits
    )
    FIGURES["canary push flows (API, form, invalid, read-only, foreign namespace, 422)"] += 6
    assert hits == []
    web.close()
