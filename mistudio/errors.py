"""Errors a user can cause: each carries the HTTP status and a message that says what to do."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

from mistudio.humanize import bytes_h


class ServiceError(Exception):
    status = 400
    code = "invalid"

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None):
        super().__init__(message)
        self.message = message
        if code:
            self.code = code
        if status:
            self.status = status


class Invalid(ServiceError):
    status = 422


class NotFound(ServiceError):
    status = 404
    code = "not_found"


class Conflict(ServiceError):
    status = 409
    code = "conflict"


def room_check(
    path: Path, needed: int, margin: int, *, what: str, hint: str = "", error=Invalid
) -> None:
    """Raise `error` (422, code disk_full) when `needed` bytes plus `margin` do not fit on the
    file system of `path` (created if missing); `what` names the work ("the download")."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(path).free
    if needed + margin > free:
        raise error(
            f"Not enough disk space in {path}: {what} needs {bytes_h(needed)} plus a"
            f" {bytes_h(margin)} margin and {bytes_h(free)} are free.{hint}",
            code="disk_full",
        )


DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT})


def is_disk_full(exc: BaseException) -> bool:
    """True for a write that failed because the disk (or a file-size or quota limit) is full,
    whether raised by Python (OSError) or by a native writer that only says so in its message
    (safetensors: "No space left on device (os error 28)")."""
    if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
        return True
    text = str(exc)
    return "No space left on device" in text or "File too large" in text
