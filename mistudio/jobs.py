"""The state every background job row carries (downloads, dataset imports, extractions).

The row is the truth for status and progress; workers claim it exactly once, refresh
`heartbeat_at` while they run, and the reconciler ends rows whose heartbeat went stale.
"""

from __future__ import annotations

from django.db import models


class JobState(models.Model):
    phase = models.CharField(max_length=200, blank=True)  # what the job is doing now, for people
    progress = models.FloatField(default=0.0)  # 0–100
    eta_seconds = models.FloatField(null=True, blank=True)
    error_message = models.TextField(blank=True)  # readable reason of error/failed/cancelled
    cancel_requested = models.BooleanField(default=False)  # polled between files/batches
    attempt = models.PositiveIntegerField(default=0)  # claims so far
    heartbeat_at = models.DateTimeField(null=True, blank=True)

    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True, db_index=True)  # the relay watches this

    class Meta:
        abstract = True


class ByteProgress(models.Model):
    """Download progress: bytes so far of a total taken before the first byte, and the rate."""

    bytes_done = models.BigIntegerField(default=0)
    bytes_total = models.BigIntegerField(default=0)
    speed_bps = models.FloatField(default=0.0)

    class Meta:
        abstract = True
