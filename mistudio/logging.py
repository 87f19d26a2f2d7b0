"""Log filter that removes anything shaped like a Hugging Face access token."""

from __future__ import annotations

import logging
import re

TOKEN_RE = re.compile(r"\bhf_[A-Za-z0-9]{8,}\b|(?i:bearer\s+)[A-Za-z0-9._\-]{8,}")


def redact(text: str) -> str:
    return TOKEN_RE.sub("[redacted]", text)


class RedactSecrets(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, ()
        return True
