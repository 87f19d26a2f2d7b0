"""Secrets kept briefly in the DB (access tokens between request and job), encrypted.

The key comes from MISTUDIO_TOKEN_KEY (a Fernet key) or is derived from the Django SECRET_KEY.
"""

from __future__ import annotations

import base64
import hashlib
import os

from cryptography.fernet import Fernet, InvalidToken
from django.conf import settings
from django.db import models


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


class SealedToken(models.Model):
    """An access token for one job, encrypted at rest and dropped when the job ends.

    Tasks receive the job's id only; the worker unseals the token from here. Concrete tables add
    one one-to-one field to their job row (its owner).
    """

    ciphertext = models.BinaryField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        abstract = True

    def __str__(self) -> str:
        return f"token for {getattr(self, f'{self.owner_field()}_id')}"

    @classmethod
    def owner_field(cls) -> str:
        """The name of the one-to-one field to the job row."""
        return next(f.name for f in cls._meta.fields if isinstance(f, models.OneToOneField))

    @classmethod
    def store(cls, owner: models.Model, token: str | None) -> None:
        """Seal and keep `token` for `owner` (nothing when there is no token)."""
        if token:
            cls.objects.create(**{cls.owner_field(): owner, "ciphertext": seal(token)})

    @classmethod
    def token_for(cls, owner_id: str) -> str | None:
        row = cls.objects.filter(**{f"{cls.owner_field()}_id": owner_id}).first()
        return unseal(row.ciphertext) if row else None

    @classmethod
    def drop(cls, owner_id: str) -> None:
        cls.objects.filter(**{f"{cls.owner_field()}_id": owner_id}).delete()
