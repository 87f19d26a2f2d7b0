"""kill -9 of the download cluster before the first byte, mid-file and between files, and of the
GPU cluster during the load check: once the cluster is started again, its start-up ends every row
with a message (the stack runs no periodic reconciler), no partial file stays, and downloading
again succeeds."""

from __future__ import annotations

import pytest

from models_app.models import Model
from models_app.tests.helpers import wait_for

from .helpers import (
    DEADLINE_S,
    MODEL_TERMINAL,
    LiveClient,
    config_precache,
    download_ready,
    partial_model_files,
    restart_and_wait,
    wait_model,
)

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

REPO = "tiny/llama"  # five small files, then 1.7 MB of weights
BIG_REPO = "tiny/llama-big"  # its Q2 load check takes seconds
DOWNLOAD_POINTS = ("before the first byte", "mid-file", "between files")


def _start_held(web: LiveClient, hub, point: str) -> str:
    """Start a download and return its id once the hub holds it at `point`."""
    if point == "mid-file":
        hub.pause(after_bytes=256 * 1024)  # the small files pass, the weights stop at 256 KiB
    else:
        config_precache(hub, REPO)
        hub.pause(after_bytes=0)  # every body stops before its first byte
    r = web.send("POST", "/api/models/download", {"hf_repo_id": REPO, "quantization": "FP16"})
    assert r.status_code == 201, r.text
    assert hub.wait_until_held(1, timeout=DEADLINE_S)
    if point == "between files":  # let the first file through, hold the next one at byte 0
        holds = hub.valve.holds
        hub.release_held()
        assert hub.wait_until_held(1, timeout=DEADLINE_S, holds=holds + 1)
    return r.json()["id"]


def _on_disk_at_kill(point: str) -> None:
    if point == "mid-file":  # the hub holds the body; the worker writes what it got so far
        assert wait_for(
            lambda: any(p.endswith(".incomplete") for p in partial_model_files(REPO)),
            timeout=DEADLINE_S,
        ), partial_model_files(REPO)


def _download_again(web: LiveClient, pk: str, repo: str, quantization: str) -> None:
    assert web.send("DELETE", f"/api/models/{pk}").status_code == 204
    row = download_ready(web, repo, quantization)
    assert web.send("DELETE", f"/api/models/{row.pk}").status_code == 204


def _crash_download_at(live, web: LiveClient, hub, point: str) -> None:
    pk = _start_held(web, hub, point)
    assert Model.objects.get(pk=pk).status == "downloading", point
    _on_disk_at_kill(point)
    live.kill("downloads")
    hub.resume()
    row = restart_and_wait(live, "downloads", lambda t: wait_model(pk, MODEL_TERMINAL, t))
    assert row.status == "error" and "download worker stopped" in row.error_message, point
    assert partial_model_files(REPO) == [], point
    _download_again(web, pk, REPO, "FP16")


def _crash_load_check(live, web: LiveClient) -> None:
    r = web.send("POST", "/api/models/download", {"hf_repo_id": BIG_REPO, "quantization": "Q2"})
    pk = r.json()["id"]
    loading = Model.objects.filter(pk=pk, phase="loading with quantization")
    wait_for(loading.exists, timeout=DEADLINE_S, every=0.01)
    live.kill("gpu")
    row = restart_and_wait(live, "gpu", lambda t: wait_model(pk, MODEL_TERMINAL, t))
    assert row.status == "error" and "GPU worker stopped" in row.error_message
    _download_again(web, pk, BIG_REPO, "Q2")


def test_a_worker_killed_at_any_point_of_a_download_leaves_no_stuck_row(live_recovery, hub):
    live = live_recovery
    web = LiveClient(live.url)
    for point in DOWNLOAD_POINTS:
        _crash_download_at(live, web, hub, point)
    _crash_load_check(live, web)
    assert not Model.objects.exclude(status__in=MODEL_TERMINAL).exists()
    web.close()
