"""Symmetric encryption for secrets kept briefly in the DB (access tokens between request and job).

The key comes from MISTUDIO_TOKEN_KEY (a Fernet key) or is derived from the Django SECRET_KEY.
"""

from __future__ import annotations

import base64
import hashlib
import os

from cryptography.fernet import Fernet, InvalidToken
from django.conf import settings


def _fernet() -> Fernet:
    key = os.environ.get("MISTUDIO_TOKEN_KEY")
    if not key:
        digest = hashlib.sha256(b"mistudio-token-key:" + settings.SECRET_KEY.encode()).digest()
        key = base64.urlsafe_b64encode(digest).decode()
    return Fernet(key)


def seal(secret: str) -> bytes:
    return _fernet().encrypt(secret.encode())


def unseal(blob: bytes) -> str | None:
    """Return the secret, or None if it cannot be decrypted (key changed)."""
    try:
        return _fernet().decrypt(bytes(blob)).decode()
    except InvalidToken:
        return None
