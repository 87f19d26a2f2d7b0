"""What the extraction job and its form read: texts, options; and delete."""

from __future__ import annotations

import pytest

from datasets_app import selectors, services, storage
from datasets_app.models import Dataset, DatasetStatus
from mistudio.errors import Conflict, NotFound

from .helpers import files_under, upload, upload_ready

pytestmark = pytest.mark.django_db(transaction=True)


def test_dataset_texts_streams_the_rows_in_order(settings):
    row = upload_ready("a.txt", "first\n\nsecond ünï\nthird\n".encode())
    texts = services.dataset_texts(row.id)
    assert next(texts) == "first" and list(texts) == ["second ünï", "third"]


def test_dataset_texts_refuses_what_is_not_ready_or_missing(settings):
    with pytest.raises(NotFound):
        services.dataset_texts("d_nope")
    row = upload("a.txt", b"one\n")
    with pytest.raises(Conflict):
        services.dataset_texts(row.id)  # queued: not normalized yet
    row = upload_ready("b.txt", b"one\n")
    Dataset.objects.filter(pk=row.id).update(status=DatasetStatus.IMPORTING)
    with pytest.raises(Conflict):
        services.dataset_texts(row.id)
    Dataset.objects.filter(pk=row.id).update(status=DatasetStatus.READY)
    storage.texts_path(row.id).unlink()
    with pytest.raises(Conflict) as err:
        services.dataset_texts(row.id)
    assert err.value.code == "missing_files"


def test_dataset_options_list_ready_datasets_with_their_sample_counts(settings):
    b = upload_ready("b.txt", b"one\ntwo\n", name="Beta")
    a = upload_ready("a.txt", b"x\n", name="alpha")
    upload("c.txt", b"y\n", name="queued")  # not listed until the worker has normalized it
    Dataset.objects.create(name="busy", source="hub", status=DatasetStatus.IMPORTING)
    assert selectors.dataset_options() == [(a.id, "alpha (1 samples)"), (b.id, "Beta (2 samples)")]


def test_delete_removes_the_row_and_its_files(settings):
    row = upload_ready("a.txt", b"one\n")
    assert files_under(settings.DATASETS_DIR)
    services.dataset_delete(row.id)
    assert not Dataset.objects.exists() and files_under(settings.DATASETS_DIR) == []
    with pytest.raises(NotFound):
        services.dataset_delete(row.id)
