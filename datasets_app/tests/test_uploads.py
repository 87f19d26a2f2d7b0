"""Uploads through the services: the request stores the file, checks its first rows and queues it
(every refusal there changes nothing); the worker normalizes every format, or ends it in error."""

from __future__ import annotations

import pytest

from datasets_app import services, tasks
from datasets_app.models import Dataset, DatasetStatus
from mistudio.errors import Conflict, Invalid, ServiceError
from mistudio.testing.queues import queued_task_payloads

from .helpers import (
    files_under,
    jsonl_bytes,
    parquet_bytes,
    story,
    upload,
    upload_ready,
    worker_ended,
)

pytestmark = pytest.mark.django_db(transaction=True)

ROWS = ["alpha", "beta", "gamma"]
FORMATS = {
    "notes.txt": (b"alpha\n\nbeta\ngamma\n", None),
    "rows.jsonl": (jsonl_bytes([{"text": t} for t in ROWS]), "text"),
    "rows.csv": (b"text,label\nalpha,1\nbeta,0\ngamma,1\n", "text"),
    "rows.parquet": (parquet_bytes({"body": ROWS}), "body"),  # snappy, pyarrow's default
    "zstd.parquet": (parquet_bytes({"body": ROWS}, compression="zstd"), "body"),
    "gzip.parquet": (parquet_bytes({"body": ROWS}, compression="gzip"), "body"),
    "plain.parquet": (parquet_bytes({"body": ROWS}, compression="none"), "body"),
}


@pytest.mark.parametrize("name", FORMATS)
def test_every_format_is_queued_by_the_request_and_ends_ready_through_the_worker(settings, name):
    content, field = FORMATS[name]
    row = upload(name, content, **({"text_field": field} if field else {}))
    fmt = name.rsplit(".", 1)[1]
    assert (row.status, row.phase, row.bytes_total) == ("queued", services.WAITING, len(content))
    assert files_under(settings.DATASETS_DIR / row.id) == [f"upload.{fmt}"]  # stored, as is
    assert [p["args"] for p in queued_task_payloads()] == [(row.id,)]
    row = worker_ended(row.id)
    assert (row.status, row.row_count, row.preview) == ("ready", 3, ROWS)
    assert row.name == name.rsplit(".", 1)[0] and row.original_filename == name
    assert row.id.startswith("d_") and row.source == "upload" and row.progress == 100
    assert files_under(settings.DATASETS_DIR / row.id) == ["texts.jsonl"]  # the upload is gone
    assert row.size_bytes == (settings.DATASETS_DIR / row.id / "texts.jsonl").stat().st_size
    assert list(services.dataset_texts(row.id)) == ROWS


def test_a_txt_upload_ignores_the_text_field(settings):
    row = upload_ready("a.txt", b"one\n", text_field="whatever", name="My notes")
    assert (row.name, row.text_field, row.row_count) == ("My notes", "", 1)


def refused(settings, name: str, content: bytes, **kwargs) -> ServiceError:
    with pytest.raises(ServiceError) as err:
        upload(name, content, **kwargs)
    assert 400 <= err.value.status < 500
    assert Dataset.objects.count() == 0
    assert files_under(settings.DATASETS_DIR) == []
    return err.value


@pytest.mark.parametrize(
    ("name", "content", "kwargs", "words"),
    [
        ("a.txt", b"ok\n\xff\xfe bad\n", {}, ["Line 2", "UTF-8"]),
        ("a.jsonl", b'{"text": "ok"}\n{oops}\n', {}, ["Line 2", "not valid JSON"]),
        ("a.jsonl", b'{"text": "ok"}\n{"content": "x"}\n', {}, ["Line 2", "no field 'text'"]),
        ("a.jsonl", b'{"text": ["a"]}\n', {}, ["Line 1", "not a string"]),
        ("a.csv", b"body\nhello\n", {}, ["no column 'text'", "body"]),
        ("a.parquet", parquet_bytes({"body": ["x"]}), {}, ["no column 'text'"]),
        ("a.parquet", parquet_bytes({"text": [1, 2]}), {}, ["not text"]),
        ("a.txt", b"", {}, ["empty"]),
        ("a.txt", b"\n \n", {}, ["No text found"]),
        ("a.xlsx", b"PK\x03\x04", {}, ["Unsupported file type .xlsx"]),
        ("noextension", b"hello", {}, ["Unsupported file type"]),
    ],
)
def test_bad_files_are_a_4xx_and_leave_nothing(settings, name, content, kwargs, words):
    err = refused(settings, name, content, **kwargs)
    assert isinstance(err, Invalid)
    for word in words:
        assert word in err.message


def test_a_file_over_the_limit_is_413(settings):
    settings.DATASET_UPLOAD_MAX_BYTES = 1000
    err = refused(settings, "a.txt", b"x" * 1001)
    assert err.status == 413 and "limited to 1.0 KB" in err.message
    with pytest.raises(ServiceError) as length:
        services.upload_length_check(str(1000 + 70_000))
    assert length.value.status == 413
    services.upload_length_check("1500")  # multipart overhead is allowed for
    services.upload_length_check(None)


def test_a_live_name_is_taken_but_a_failed_one_is_free(settings):
    upload("a.txt", b"one\n", name="shared")  # queued: the name is taken already
    with pytest.raises(Conflict):
        upload("b.txt", b"two\n", name="shared")
    assert Dataset.objects.count() == 1 and len(files_under(settings.DATASETS_DIR)) == 1
    Dataset.objects.update(status=DatasetStatus.ERROR)
    assert upload_ready("c.txt", b"three\n", name="shared").is_ready


def test_a_file_past_the_first_rows_check_is_normalized_by_the_worker(settings):
    content = jsonl_bytes([{"text": story(i)} for i in range(2000)])
    row = upload("big.jsonl", content)
    assert row.status == DatasetStatus.QUEUED and row.bytes_total == len(content)
    assert files_under(settings.DATASETS_DIR / row.id) == ["upload.jsonl"]
    row = worker_ended(row.id)
    assert (row.status, row.row_count, row.progress) == ("ready", 2000, 100.0)
    assert files_under(settings.DATASETS_DIR / row.id) == ["texts.jsonl"]
    assert next(services.dataset_texts(row.id)) == story(0)


def test_a_wrong_field_is_refused_at_once(settings):
    err = refused(settings, "big.jsonl", jsonl_bytes([{"body": "x"}] * 50))
    assert "no field 'text'" in err.message


def test_the_request_checks_only_the_first_rows_the_worker_reads_the_rest(settings):
    content = jsonl_bytes([{"text": story(i)} for i in range(500)]) + b"{broken\n"
    row = upload("big.jsonl", content)
    assert row.status == DatasetStatus.QUEUED  # line 501 is past the request's 200 rows
    row = worker_ended(row.id)
    assert row.status == DatasetStatus.ERROR and "Line 501" in row.error_message
    assert files_under(settings.DATASETS_DIR) == []


def test_an_upload_over_the_inflated_cap_is_queued_then_ended_by_the_worker(settings):
    settings.DATASET_INFLATED_MAX_BYTES = 1024  # the request does not normalize: no cap applies
    row = upload("big.txt", b"a line of text\n" * 1000)
    assert row.status == DatasetStatus.QUEUED
    row = worker_ended(row.id)
    assert row.status == DatasetStatus.ERROR
    assert "MISTUDIO_DATASET_INFLATED_MAX_MB" in row.error_message
    assert not (settings.DATASETS_DIR / row.id).exists()


def test_a_queued_upload_can_be_cancelled_before_the_worker_starts(settings):
    row = upload("big.txt", b"line\n" * 100)
    assert files_under(settings.DATASETS_DIR / row.id) == ["upload.txt"]
    assert services.dataset_cancel(row.id).status == DatasetStatus.CANCELLED
    assert not (settings.DATASETS_DIR / row.id).exists()  # the stored upload is removed
    tasks.dataset_normalize_task(row.id)  # delivered after the cancel: does nothing
    assert Dataset.objects.get(pk=row.id).status == DatasetStatus.CANCELLED
    assert files_under(settings.DATASETS_DIR) == []
