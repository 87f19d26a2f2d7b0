"""The database's own guard: constraints that hold on SQLite and PostgreSQL alike, even for
writes that skip the schema (raw ORM, a buggy migration, the admin shell)."""

from __future__ import annotations

import pytest
from django.db import DataError, IntegrityError, transaction

from mistudio import limits
from templates_app.models import ExtractionTemplate

from .helpers import VALID

pytestmark = pytest.mark.django_db(transaction=True)


def raw_insert(**fields) -> None:
    with transaction.atomic():
        ExtractionTemplate.objects.create(**{**VALID, **fields})


def test_a_valid_row_is_accepted():
    raw_insert(name="ok")
    row = ExtractionTemplate.objects.get()
    assert row.top_k_examples == 100 and row.created_at <= row.updated_at


@pytest.mark.parametrize(
    "fields",
    [
        {"name": ""},
        {"name": "x" * 256},
        {"description": "d" * 501},
        {"layers": []},
        {"layers": "0,1"},
        {"layers": {"0": 1}},
        {"layers": list(range(257))},
        {"hook_types": []},
        {"hook_types": [*limits.HOOK_TYPES, "mlp"]},
        {"max_samples": 0},
        {"max_samples": 100_000_001},
        {"batch_size": 0},
        {"batch_size": 1025},
        {"context_size": 1},
        {"context_size": 131_073},
        {"top_k_examples": 0},
        {"top_k_examples": 10_001},
    ],
)
def test_the_database_refuses_rows_the_schema_would_refuse(fields):
    with pytest.raises((IntegrityError, DataError)):  # PostgreSQL: varchar overflow is DataError
        raw_insert(name=fields.pop("name", "row"), **fields)
    assert ExtractionTemplate.objects.count() == 0


def test_names_are_unique():
    raw_insert(name="twice")
    with pytest.raises(IntegrityError):
        raw_insert(name="twice")


def test_updated_at_moves_on_every_save_and_created_at_stays():
    raw_insert(name="row")
    row = ExtractionTemplate.objects.get()
    created, updated = row.created_at, row.updated_at
    row.batch_size = 64
    row.save()
    row.refresh_from_db()
    assert row.created_at == created and row.updated_at > updated
