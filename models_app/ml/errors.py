"""Errors of an extraction, shared by the modules that run one."""

from __future__ import annotations


class ExtractionError(RuntimeError):
    """An extraction that cannot run or failed; the message is meant for the user."""


class ExtractionCancelled(Exception):  # noqa: N818 - an outcome, not an error
    """The caller asked to stop; partial files were removed."""
