"""Schemas every API router shares: the error body and the error statuses it documents."""

from __future__ import annotations

from datetime import datetime

from ninja import Schema


class ErrorOut(Schema):
    detail: str
    code: str = "invalid"


class JobOut(Schema):
    """The state every job row reports (mistudio.jobs.Job)."""

    status: str
    phase: str
    progress: float  # 0–100
    eta_seconds: float | None
    error_message: str
    created_at: datetime
    updated_at: datetime


class ByteCountsOut(Schema):
    """Transfer fields of a job that moves bytes (mistudio.jobs.ByteCounts)."""

    bytes_done: int
    bytes_total: int
    speed_bps: float


# Every 4xx a route may answer (and 502 when the Hub cannot be reached), for the OpenAPI docs.
ERRORS = {code: ErrorOut for code in (400, 401, 403, 404, 409, 413, 422, 502)}
