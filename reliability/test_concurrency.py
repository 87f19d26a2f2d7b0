"""Ten extraction requests at once: the one-worker GPU cluster runs them one at a time (never
two on one device), the others show `queued` meanwhile, and all of them complete."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from django.db import connections

from models_app.models import ExtractionJob
from models_app.tests.helpers import text_dataset, wait_for

from .conftest import figure_max
from .helpers import EXTRACTION_TERMINAL, LiveClient, download_ready

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

REQUESTS = 10
PARAMS = {
    "layers": [0, 1],
    "hook_types": ["residual", "mlp"],
    "batch_size": 4,
    "max_samples": 24,
    "context_size": 32,
}


class StatusSampler(threading.Thread):
    """Reads every job's status over and over; keeps the most `running` seen in one read and
    whether a read saw jobs queued behind a running one."""

    def __init__(self):
        super().__init__(daemon=True)
        self.stop = threading.Event()
        self.max_running = 0
        self.saw_queued_behind = False
        self.samples = 0

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                statuses = list(ExtractionJob.objects.values_list("status", flat=True))
                running = statuses.count("running")
                self.max_running = max(self.max_running, running)
                self.saw_queued_behind |= running == 1 and "queued" in statuses
                self.samples += 1
                self.stop.wait(0.002)
        finally:
            connections.close_all()


def _post_all_at_once(web: LiveClient, path: str, body: dict) -> list[int]:
    start = threading.Barrier(REQUESTS)

    def post(_):
        start.wait()
        return web.send("POST", path, body)

    with ThreadPoolExecutor(REQUESTS) as pool:
        return [r.status_code for r in pool.map(post, range(REQUESTS))]


def _never_overlapped(jobs: list[ExtractionJob]) -> bool:
    spans = sorted((j.started_at, j.finished_at) for j in jobs)
    return all(later[0] >= earlier[1] for earlier, later in zip(spans, spans[1:], strict=False))


def test_ten_extraction_requests_at_once_never_run_two_on_one_device(live, hub):
    web = LiveClient(live.url)
    model = download_ready(web, "tiny/llama", "FP16")
    dataset = text_dataset()
    sampler = StatusSampler()
    sampler.start()
    path = f"/api/models/{model.pk}/extract-activations"
    assert _post_all_at_once(web, path, {"dataset_id": dataset.pk, **PARAMS}) == [202] * REQUESTS
    done = ExtractionJob.objects.filter(status__in=EXTRACTION_TERMINAL)
    wait_for(lambda: done.count() == REQUESTS, timeout=600, every=0.1)
    sampler.stop.set()
    sampler.join()
    jobs = list(ExtractionJob.objects.all())
    assert [j.status for j in jobs] == ["completed"] * REQUESTS
    assert sampler.max_running == 1 and sampler.saw_queued_behind, vars(sampler)
    assert _never_overlapped(jobs)
    figure_max("concurrent GPU jobs observed (max)", sampler.max_running)
    figure_max("status samples read during the concurrency test", sampler.samples)
    web.close()
