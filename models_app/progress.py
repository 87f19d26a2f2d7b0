"""Job progress: throttled DB writes (the truth) plus a channel-layer hint for live pages."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager

from django.conf import settings
from django.db import close_old_connections
from django.utils import timezone

from mistudio.realtime import group_notify

log = logging.getLogger(__name__)

MODELS_GROUP = "models"


def notify(event: str, model_id: str) -> None:
    """Tell connected pages a model card changed (`card.changed`) or went away (`card.deleted`)."""
    group_notify(MODELS_GROUP, event, model_id)


def row_update(model_cls, pk: str, **fields) -> int:
    """UPDATE one row with `fields` plus updated_at/heartbeat_at; send the change hint."""
    now = timezone.now()
    n = model_cls.objects.filter(pk=pk).update(updated_at=now, heartbeat_at=now, **fields)
    if n:
        notify("card.changed", pk)
    return n


class ByteProgress:
    """Turns a running byte count into throttled progress writes with speed and ETA."""

    def __init__(self, write: Callable[..., None], total: int, *, interval: float = 0.25):
        self.write = write
        self.total = max(int(total), 1)
        self.interval = interval
        self.started = time.monotonic()
        self.last_write = 0.0
        self.done = 0
        self.samples: list[tuple[float, int]] = []

    def __call__(self, done: int) -> None:
        self.done = max(self.done, int(done))
        now = time.monotonic()
        self.samples.append((now, self.done))
        if now - self.last_write >= self.interval or self.done >= self.total:
            self.flush(now)

    def speed(self, now: float) -> float:
        # bytes/s over the last ~3 s, so the ETA follows the current rate
        recent = [(t, d) for t, d in self.samples if now - t <= 3.0] or self.samples[-1:]
        self.samples = recent
        (t0, d0), (t1, d1) = recent[0], recent[-1]
        if t1 - t0 < 0.05:
            elapsed = max(now - self.started, 1e-6)
            return self.done / elapsed
        return (d1 - d0) / (t1 - t0)

    def flush(self, now: float | None = None) -> None:
        now = now or time.monotonic()
        self.last_write = now
        speed = self.speed(now)
        remaining = max(self.total - self.done, 0)
        eta = remaining / speed if speed > 0 else None
        progress = min(100.0, 100.0 * self.done / self.total)
        self.write(progress=progress, bytes_done=self.done, speed_bps=speed, eta_seconds=eta)


@contextmanager
def heartbeat(model_cls, pk: str, *, every: float | None = None):
    """Keep `heartbeat_at` fresh from a thread during long steps that report no progress.

    Beats every `every` seconds (default: a quarter of STALE_HEARTBEAT_SECONDS, so a live job is
    never taken for a dead one by the reconciler)."""
    every = every or settings.STALE_HEARTBEAT_SECONDS / 4
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(every):
            try:
                model_cls.objects.filter(pk=pk).update(heartbeat_at=timezone.now())
            except Exception:  # noqa: BLE001
                log.warning("heartbeat failed for %s", pk, exc_info=True)
            finally:
                close_old_connections()

    thread = threading.Thread(target=beat, name=f"heartbeat-{pk}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)
