"""Helpers for the live fault-injection tests: an HTTP client for the live stack, row waits,
partial-file checks, and finding the GPU worker process in the cluster's log."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import httpx
from django.conf import settings
from huggingface_hub import HfApi, hf_hub_download

from models_app.models import ExtractionJob, Model
from models_app.repo import repo_cache_dir
from models_app.tests.helpers import CORPUS, text_dataset, wait_for

from .conftest import FIGURES, figure_max

MODEL_TERMINAL = ("ready", "error", "cancelled")
EXTRACTION_TERMINAL = ("completed", "failed", "cancelled")
# How long a test waits for a state that needs processes to start and jobs to run: generous, so a
# busy machine passes; what the tests prove comes from the set-up (RECOVERY_ENV), not the clock.
DEADLINE_S = 300


class LiveClient:
    """httpx against the live daphne, with the CSRF token the pages hand out."""

    def __init__(self, url: str):
        self.http = httpx.Client(base_url=url, timeout=60)
        self.responses: list[httpx.Response] = []
        self.get("/models/")
        self.csrf = self.http.cookies["csrftoken"]

    def _keep(self, response: httpx.Response) -> httpx.Response:
        self.responses.append(response)
        return response

    def get(self, path: str) -> httpx.Response:
        return self._keep(self.http.get(path))

    def send(self, method: str, path: str, data: dict | None = None) -> httpx.Response:
        headers = {"X-CSRFToken": self.csrf}
        return self._keep(self.http.request(method, path, json=data, headers=headers))

    def close(self) -> None:
        self.http.close()


def model_row(pk: str) -> Model:
    return Model.objects.get(pk=pk)


def wait_model(pk: str, status: str | tuple, timeout: float = DEADLINE_S) -> Model:
    statuses = (status,) if isinstance(status, str) else status
    return wait_for(lambda: _row_in(Model, pk, statuses), timeout=timeout, every=0.02)


def wait_extraction(pk: str, status: str | tuple, timeout: float = DEADLINE_S) -> ExtractionJob:
    statuses = (status,) if isinstance(status, str) else status
    return wait_for(lambda: _row_in(ExtractionJob, pk, statuses), timeout=timeout, every=0.02)


def _row_in(model_cls, pk: str, statuses: tuple):
    row = model_cls.objects.filter(pk=pk).first()
    return row if row is not None and row.status in statuses else None


def download_ready(web: LiveClient, repo: str, quantization: str) -> Model:
    """Download through the live API and wait for the load check; return the ready row."""
    r = web.send("POST", "/api/models/download", {"hf_repo_id": repo, "quantization": quantization})
    assert r.status_code == 201, r.text
    row = wait_model(r.json()["id"], MODEL_TERMINAL)
    assert row.status == "ready", row.error_message
    return row


def config_precache(hub, repo: str, token: str | None = None) -> None:
    """Put config.json in the HF cache, so a request's preflight needs no file body (while the
    hub holds every body, a download then stops before its first byte)."""
    sha = HfApi(endpoint=hub.endpoint).model_info(repo, token=token).sha
    hf_hub_download(
        repo,
        "config.json",
        revision=sha,
        token=token,
        endpoint=hub.endpoint,
        cache_dir=settings.MODELS_CACHE_DIR,
    )


def partial_model_files(repo: str) -> list[str]:
    """Unfinished blobs, and lock files of blobs that are not complete, that an interrupted
    download may leave in the HF cache (huggingface_hub keeps the lock of a finished blob)."""
    cache = Path(settings.MODELS_CACHE_DIR)
    root = repo_cache_dir(cache, repo)
    found = [*root.glob("blobs/*.incomplete"), *root.glob("**/*.lock")]
    locks = cache / ".locks" / root.name
    found += [p for p in locks.rglob("*") if p.is_file()] if locks.exists() else []
    finished = {p.name for p in root.glob("blobs/*") if not p.name.endswith(".incomplete")}
    return [str(p) for p in found if p.name.removesuffix(".lock") not in finished]


def restart_and_wait(live, cluster: str, wait) -> object:
    """Start `cluster` again and wait until `wait(deadline)` returns the row in a terminal state
    (on `live_recovery` only the restarted worker's start-up can end it); count the crash (and
    the row, if it stayed stuck) and record how long it took."""
    started = time.monotonic()
    live.start_cluster(cluster)
    try:
        row = wait(DEADLINE_S)
    except AssertionError as exc:
        crash_recorded(stuck=1)
        raise AssertionError(f"a row stayed stuck after the restart\n{live.logs()}") from exc
    crash_recorded(stuck=0)
    figure_max("seconds from restart to a terminal row (max)", time.monotonic() - started)
    return row


def crash_recorded(stuck: int) -> None:
    FIGURES["crashes injected (kill -9)"] += 1
    FIGURES["rows left stuck after a crash"] += stuck


WORKER_READY = re.compile(rb"ready for work at (\d+)")


def gpu_worker_pid(live) -> int:
    """The pid of the GPU cluster's current worker, as django-q2 logs it when the worker starts."""
    log = (live.log_dir / "gpu.log").read_bytes()
    pids = WORKER_READY.findall(log)
    assert pids, log[-2000:]
    return int(pids[-1])


def kill_pid(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)


def deliveries(live, task_name: str) -> int:
    """How many times the GPU cluster's workers started the task called `task_name`."""
    return (live.log_dir / "gpu.log").read_text().count(f"processing {task_name} ")


def big_dataset(lines: int = 2000):
    """A ready dataset of several hundred thousand tokens (long runs of tiny/llama's layer 0)."""
    return text_dataset("big", [f"{CORPUS[i % 5]} word{i} " * 12 for i in range(lines)])
