"""Each test phase runs on the backends it claims (scripts/test sets MISTUDIO_TEST_BACKEND)."""

from __future__ import annotations

import os

import pytest

from mistudio.testing.backends import EXPECTED, backend_problems, backends_in_use

pytestmark = pytest.mark.django_db


def test_this_phase_runs_on_the_backends_it_claims():
    expected = os.environ.get("MISTUDIO_TEST_BACKEND")
    if expected is None:  # a local run outside scripts/test: report what is in use
        expected = "postgres" if backends_in_use()["database"] == "postgresql" else "sqlite"
    assert expected in EXPECTED
    assert backend_problems(expected) == []
