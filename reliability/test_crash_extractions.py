"""kill -9 of the GPU cluster during an extraction (while the model loads before the first batch,
mid-run, while a shard is written) and of the GPU worker alone under a job: every row ends within
the reconciler's period, no partial file stays, queued jobs go on, and the job runs again."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from django.conf import settings
from django_q.models import OrmQ

from models_app.models import ExtractionJob
from models_app.reconcile import EXTRACTION_STALE
from models_app.tests.helpers import wait_for

from .conftest import TASK_RETRY_S, figure_max
from .helpers import (
    EXTRACTION_TERMINAL,
    RECONCILE_BOUND_S,
    LiveClient,
    big_dataset,
    crash_recorded,
    deliveries,
    download_ready,
    gpu_worker_pid,
    kill_pid,
    restart_and_wait,
    wait_extraction,
)

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

LAYER0 = {"layers": [0], "hook_types": ["residual"]}
SMALL = {**LAYER0, "batch_size": 4, "max_samples": 8}
# tiny/llama's layer 0, 16 tokens per sequence in batches of 2: 1250 batches over seconds (with
# batches of 64 a fast machine finished between two reads of the row), progress shown every half
# second, one 20 MB shard, finished at the end (a temp file until then)
MID = {**LAYER0, "batch_size": 2, "max_samples": 2500, "context_size": 16}
# 9000 sequences: the first shard (4096 sequences, 32 MiB at MISTUDIO_SHARD_MB's default) is
# written while the run goes on for about as long again
SHARD = {**LAYER0, "batch_size": 512, "max_samples": 9000, "context_size": 16}


def _extract(web: LiveClient, model, dataset, params: dict) -> str:
    r = web.send(
        "POST",
        f"/api/models/{model.pk}/extract-activations",
        {"dataset_id": dataset.pk, **params},
    )
    assert r.status_code == 202, r.text
    return r.json()["extraction_id"]


def _shard_files(job_id: str) -> list[Path]:
    """The job's finished shards (a shard being written is a hidden temp file until closed)."""
    out = Path(settings.ACTIVATIONS_DIR) / job_id
    return [p for p in out.rglob("*.safetensors") if not p.name.startswith(".")]


def _wait_running(job_id: str, point: str) -> None:
    """Return once the running job reached `point`."""
    reached = {
        "before the first batch": lambda j: j.phase == "loading the model",
        "mid-run": lambda j: j.tokens_done > 0 and not _shard_files(j.pk),
        "at shard write": lambda j: bool(_shard_files(j.pk)),
    }[point]

    def at_point():
        job = ExtractionJob.objects.get(pk=job_id)
        assert job.status in ("queued", "running"), (point, job.status, job.error_message)
        return job.status == "running" and reached(job)

    wait_for(at_point, timeout=120, every=0.005)


def _killed_job_ends_clean(live, job_id: str, point: str) -> None:
    job = restart_and_wait(live, "gpu", lambda t: wait_extraction(job_id, EXTRACTION_TERMINAL, t))
    assert (job.status, job.error_message) == ("failed", EXTRACTION_STALE), point
    assert not Path(job.output_path).exists(), point


def _crash_at(live, web, model, dataset, params: dict, point: str) -> None:
    job_id = _extract(web, model, dataset, params)
    _wait_running(job_id, point)
    live.kill("gpu")
    _killed_job_ends_clean(live, job_id, point)
    again = wait_extraction(_extract(web, model, dataset, params), EXTRACTION_TERMINAL)
    assert again.status == "completed", (point, again.error_message)


def _crash_while_loading(live, web, big, small, dataset) -> None:
    """The model loads (seconds, for Q2) before the first batch; a job waits behind it."""
    job_id = _extract(web, big, dataset, SMALL)
    behind = _extract(web, small, dataset, SMALL)
    _wait_running(job_id, "before the first batch")
    live.kill("gpu")
    _killed_job_ends_clean(live, job_id, "before the first batch")
    # the dead cluster had taken it from the queue: queued again at start-up, not after `retry`
    # seconds (ORM broker) or never (Redis)
    assert wait_extraction(behind, EXTRACTION_TERMINAL, timeout=25).status == "completed"
    again = wait_extraction(_extract(web, big, dataset, SMALL), EXTRACTION_TERMINAL)
    assert again.status == "completed", again.error_message


def test_a_gpu_cluster_killed_at_any_point_of_an_extraction_leaves_no_stuck_row(live, hub):
    web = LiveClient(live.url)
    big = download_ready(web, "tiny/llama-big", "Q2")
    small = download_ready(web, "tiny/llama", "FP16")  # now resident: the big one loads again
    dataset = big_dataset()
    _crash_while_loading(live, web, big, small, dataset)
    _crash_at(live, web, small, dataset, MID, "mid-run")
    _crash_at(live, web, small, dataset, SHARD, "at shard write")
    assert not ExtractionJob.objects.exclude(status__in=EXTRACTION_TERMINAL).exists()
    kept = {p.name for p in Path(settings.ACTIVATIONS_DIR).iterdir()}
    completed = ExtractionJob.objects.filter(status="completed").values_list("pk", flat=True)
    assert kept == set(completed)
    web.close()


def _kill_worker_whenever_running(live, job_id: str) -> int:
    """SIGKILL the GPU worker each time it runs the job, until the job is over; return kills."""
    kills = 0

    def over() -> bool:
        nonlocal kills
        job = ExtractionJob.objects.get(pk=job_id)
        if job.status == "running" and job.attempt > kills:
            kill_pid(gpu_worker_pid(live))
            kills += 1
        return job.status in EXTRACTION_TERMINAL

    started = time.monotonic()
    try:
        wait_for(over, timeout=RECONCILE_BOUND_S, every=0.005)
    finally:
        stuck = ExtractionJob.objects.get(pk=job_id).status not in EXTRACTION_TERMINAL
        for _ in range(kills):
            crash_recorded(stuck=int(stuck))
    figure_max("seconds from a worker's death to a terminal row (max)", time.monotonic() - started)
    return kills


def _in_broker(task_name: str) -> bool:
    return any(q.task.get("name") == task_name for q in OrmQ.objects.filter(key="gpu"))


def _redelivered_and_acknowledged(live, job_id: str) -> int:
    """Return how many times the job's task was delivered, once it is out of the broker. The ORM
    broker hands a dead worker's task out once more after `retry` seconds; the claim makes that
    a no-op and the task is acknowledged. Redis never hands it out again."""
    task_name = f"extraction_run_task {job_id}"
    if not settings.REDIS_URL:
        wait_for(lambda: not _in_broker(task_name), timeout=TASK_RETRY_S + 60, every=0.2)
        wait_for(lambda: deliveries(live, task_name) == 2, timeout=30)
    return deliveries(live, task_name)


def test_a_job_that_kills_its_worker_runs_at_most_twice_then_fails_and_others_flow(live, hub):
    web = LiveClient(live.url)
    model = download_ready(web, "tiny/llama", "FP16")
    dataset = big_dataset()
    poison = _extract(web, model, dataset, MID)
    behind = [_extract(web, model, dataset, SMALL) for _ in range(2)]
    assert _kill_worker_whenever_running(live, poison) == 1
    job = ExtractionJob.objects.get(pk=poison)
    assert (job.status, job.error_message, job.attempt) == ("failed", EXTRACTION_STALE, 1)
    after = _extract(web, model, dataset, MID)  # the same job again, as a fresh request
    for job_id in [*behind, after]:
        assert wait_extraction(job_id, EXTRACTION_TERMINAL).status == "completed"
    delivered = _redelivered_and_acknowledged(live, poison)
    figure_max("deliveries of a task that killed its worker (max)", delivered)
    assert delivered <= 2
    assert ExtractionJob.objects.get(pk=poison).status == "failed"
    web.close()
