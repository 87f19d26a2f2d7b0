"""Schemas every API router shares: the error body and the error statuses it documents."""

from __future__ import annotations

from ninja import Schema


class ErrorOut(Schema):
    detail: str
    code: str = "invalid"


# Every 4xx a route may answer (and 502 when the Hub cannot be reached), for the OpenAPI docs.
ERRORS = {code: ErrorOut for code in (400, 401, 403, 404, 409, 413, 422, 502)}
