"""The one job model every background job row inherits (downloads, dataset imports, extractions).

The row is the truth for status and progress. A worker takes a queued step exactly once
(`claim`), writes progress through `touch` (which also refreshes `heartbeat_at` and tells the
live pages), polls `cancel_requested` between files or batches, and keeps the heartbeat fresh with
`heartbeat` during long silent steps; the reconciler ends rows whose heartbeat went stale.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import ClassVar

from django.conf import settings
from django.db import IntegrityError, close_old_connections, models, transaction
from django.db.models import F, Q
from django.utils import timezone
from django_q.tasks import async_task

from mistudio.errors import Conflict
from mistudio.realtime import group_notify
from mistudio.secretbox import SealedToken

log = logging.getLogger(__name__)


class Job(models.Model):
    """Status-agnostic job state; concrete rows add `status` and their own fields.

    `live_group` names the realtime group whose pages show these rows; `card_ids(pk)` says which
    card ids a change of row `pk` refreshes (an extraction refreshes its model's card).
    """

    phase = models.CharField(max_length=200, blank=True)  # what the job is doing now, for people
    progress = models.FloatField(default=0.0)  # 0–100
    eta_seconds = models.FloatField(null=True, blank=True)
    error_message = models.TextField(blank=True)  # readable reason of error/failed/cancelled
    # The user asked to stop; polled between files/batches (see cancel_requested()).
    cancel_flag = models.BooleanField(default=False, db_column="cancel_requested")
    attempt = models.PositiveIntegerField(default=0)  # claims so far
    heartbeat_at = models.DateTimeField(null=True, blank=True)

    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True, db_index=True)  # the relay watches this

    live_group: ClassVar[str] = ""
    active_statuses: ClassVar[tuple[str, ...]] = ()  # statuses of a job not yet ended

    class Meta:
        abstract = True
        constraints = [
            models.CheckConstraint(
                condition=Q(progress__gte=0) & Q(progress__lte=100),
                name="%(app_label)s_%(class)s_progress_0_100",
            )
        ]

    @property
    def is_active(self) -> bool:
        return self.status in self.active_statuses

    @property
    def is_ready(self) -> bool:
        """Whether the job's product (a model, a dataset) can be used."""
        return self.status == "ready"

    @classmethod
    def create_queued(
        cls,
        *,
        task: Callable[[str], None] | None,
        conflict: str,
        token: str | None = None,
        tokens: type[SealedToken] | None = None,
        **fields,
    ) -> Job:
        """Insert a row with `fields`, seal its access token in `tokens`, and queue `task(pk)`
        once the transaction commits. Conflict (409, `conflict`) when a unique constraint
        refuses the row (a live duplicate); nothing is kept then."""
        try:
            with transaction.atomic():
                row = cls.objects.create(**fields)
                if token and tokens:
                    tokens.store(row, token)
                if task:
                    transaction.on_commit(lambda: task(row.pk))
        except IntegrityError:
            raise Conflict(conflict, code="duplicate") from None
        cls.announce(row.pk)
        return row

    @classmethod
    def card_ids(cls, pk: str) -> list[str]:
        return [pk]

    @classmethod
    def announce(cls, pk: str, event: str = "card.changed") -> None:
        """Tell live pages that row `pk` changed (`card.changed`) or went (`card.deleted`)."""
        for card_id in cls.card_ids(pk):
            group_notify(cls.live_group, event, card_id)

    @classmethod
    def claim(cls, pk: str, *, from_status: str, where: dict | None = None, **fields) -> bool:
        """Take a queued step exactly once: UPDATE the row in `from_status` (and matching
        `where`), not cancelled, setting `fields` and bumping `attempt`. False when a second
        delivery (or a cancel) got there first."""
        now = timezone.now()
        where = {"pk": pk, "status": from_status, "cancel_flag": False, **(where or {})}
        n = cls.objects.filter(**where).update(
            attempt=F("attempt") + 1, heartbeat_at=now, updated_at=now, **fields
        )
        if n:
            cls.announce(pk)
        return n == 1

    @classmethod
    def touch(cls, pk: str, **fields) -> int:
        """UPDATE row `pk` with `fields`, refresh updated_at/heartbeat_at and tell live pages.
        Returns the number of rows updated (0 when the row is gone)."""
        now = timezone.now()
        n = cls.objects.filter(pk=pk).update(updated_at=now, heartbeat_at=now, **fields)
        if n:
            cls.announce(pk)
        return n

    @classmethod
    def advance(cls, pk: str, *, from_status: str, **fields) -> bool:
        """End a step: move row `pk` from `from_status` on (`fields`: the next step's waiting
        state, or success) in one UPDATE that fails when the user asked to stop. A cancel the
        API accepted is never lost between a step's last poll and its end: it lands before
        (False: the caller ends the job `cancelled`) or after (a cancel ends a waiting row at
        once; a finished one has nothing left to cancel). False too when the row left
        `from_status` (deleted, or ended by the reconciler)."""
        now = timezone.now()
        n = cls.objects.filter(pk=pk, status=from_status, cancel_flag=False).update(
            updated_at=now, heartbeat_at=now, **fields
        )
        if n:
            cls.announce(pk)
        return n == 1

    @classmethod
    def stopped_in(cls, pk: str, status: str) -> bool:
        """Whether row `pk` is still in `status` with a cancel asked for (after advance() failed:
        the caller ends it cancelled; otherwise someone else already ended it)."""
        return cls.objects.filter(pk=pk, status=status, cancel_flag=True).exists()

    @classmethod
    def cancel_requested(cls, pk: str) -> bool:
        """Whether the user asked to stop row `pk` (read from the database, not a cached row)."""
        return cls.objects.filter(pk=pk, cancel_flag=True).exists()

    @classmethod
    def request_cancel(cls, pk: str, *, active: Iterable[str], what: str) -> None:
        """Ask row `pk` to stop: set its cancel flag, in one UPDATE that only takes a row in one
        of the `active` statuses. Conflict (409) when the row has ended meanwhile (read, then a
        worker finished it): a cancel answered 200 always ends the job cancelled."""
        n = cls.objects.filter(pk=pk, status__in=list(active)).update(
            cancel_flag=True, updated_at=timezone.now()
        )
        if n == 0:
            status = cls.objects.filter(pk=pk).values_list("status", flat=True).first()
            raise Conflict(f"{what} is {status or 'gone'}; there is nothing to cancel.")

    @classmethod
    @contextmanager
    def heartbeat(cls, pk: str, *, every: float | None = None) -> Iterator[None]:
        """Keep `heartbeat_at` fresh from a thread during long steps that report no progress.

        Beats every `every` seconds (default: a quarter of STALE_HEARTBEAT_SECONDS, so a live job
        is never taken for a dead one by the reconciler)."""
        every = every or settings.STALE_HEARTBEAT_SECONDS / 4
        beat = lambda: cls.objects.filter(pk=pk).update(heartbeat_at=timezone.now())  # noqa: E731
        with beating(beat, every=every, name=f"heartbeat-{pk}"):
            yield


def enqueue(func: str, job_id: str, *, cluster: str) -> None:
    """Queue the task `func` (a dotted path) with the job's id as its only argument on the
    django-q2 `cluster`; tasks never receive anything else (no tokens, no file contents)."""
    name = func.rsplit(".", 1)[-1]
    async_task(func, job_id, cluster=cluster, task_name=f"{name} {job_id}")


class ByteCounts(models.Model):
    """Transfer fields of a job that moves bytes: done of a total taken before the first byte."""

    bytes_done = models.BigIntegerField(default=0)
    bytes_total = models.BigIntegerField(default=0)
    speed_bps = models.FloatField(default=0.0)

    class Meta:
        abstract = True


class ByteRate:
    """Turns a running byte count into throttled writes of progress, speed and ETA.

    `write(progress=…, bytes_done=…, speed_bps=…, eta_seconds=…)` is called at most every
    `interval` seconds and once more at the end; speed is taken over the last ~3 s."""

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
        """Bytes/s over the last ~3 s, so the ETA follows the current rate."""
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
        speed = self.speed(now) if self.samples else 0.0
        remaining = max(self.total - self.done, 0)
        eta = remaining / speed if speed > 0 else None
        progress = min(100.0, 100.0 * self.done / self.total)
        self.write(progress=progress, bytes_done=self.done, speed_bps=speed, eta_seconds=eta)


@contextmanager
def beating(beat: Callable[[], object], *, every: float, name: str) -> Iterator[None]:
    """Call `beat()` (a heartbeat write) every `every` seconds from a daemon thread while the
    block runs; a failing beat is logged and tried again; the thread's DB connections close."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(every):
            try:
                beat()
            except Exception:  # noqa: BLE001
                log.warning("%s failed", name, exc_info=True)
            finally:
                close_old_connections()

    thread = threading.Thread(target=loop, name=name, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)
