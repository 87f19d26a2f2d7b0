"""Decompression bombs in every accepted format, uploaded and from the Hub: a row over the row
cap or a dataset that inflates past the inflated-size cap ends `error` (or a 4xx for an upload
refused in the request) with a message naming the cap, and no file is left. The request never
normalizes more than DATASET_INLINE_MAX_BYTES of output (a bomb goes to the worker). Peak
memory of the same bombs at full size is measured in benchmarks/hostile_input.py."""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from datasets_app import services, tasks
from datasets_app.models import Dataset, DatasetStatus
from mistudio.errors import Invalid

from .conftest import FIGURES

pytestmark = pytest.mark.django_db(transaction=True)

MB = 1024 * 1024


@pytest.fixture
def caps(settings):
    """Small caps so that the bombs stay small: 1 MB rows, 4 MB in the request, 24 MB in all."""
    settings.DATASET_ROW_MAX_BYTES = 1 * MB
    settings.DATASET_INLINE_MAX_BYTES = 4 * MB
    settings.DATASET_INFLATED_MAX_BYTES = 24 * MB
    return settings


def parquet_bomb(rows: int, value_bytes: int) -> bytes:
    """`rows` rows of one `value_bytes` text, dictionary-encoded and zstd-compressed (the
    576-byte file of issue 13 is this with 1,024 × 4 MiB)."""
    value = "a" * value_bytes
    column = pa.DictionaryArray.from_arrays(pa.array([0] * rows, pa.int32()), pa.array([value]))
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": column}), buf, compression="zstd", use_dictionary=True)
    return buf.getvalue()


def many_rows(fmt: str, rows: int, row_bytes: int) -> bytes:
    text = "b" * row_bytes
    if fmt == "parquet":
        return parquet_bomb(rows, row_bytes)
    line = {"txt": text, "jsonl": f'{{"text": "{text}"}}', "csv": text}[fmt]
    head = "text\n" if fmt == "csv" else ""
    return (head + (line + "\n") * rows).encode()


def files_left(settings) -> list[Path]:
    root = Path(settings.DATASETS_DIR)
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


def upload(name: str, data: bytes):
    return services.dataset_upload(upload=SimpleUploadedFile(name, data), text_field="text")


@pytest.mark.parametrize("fmt", ["txt", "jsonl", "csv", "parquet"])
def test_an_uploaded_row_over_the_row_cap_is_refused_and_leaves_nothing(caps, fmt):
    with pytest.raises(Invalid) as exc:
        upload(f"bomb.{fmt}", many_rows(fmt, 3, 2 * MB))
    assert "MISTUDIO_DATASET_ROW_MAX_MB" in exc.value.message
    assert not Dataset.objects.exists() and files_left(caps) == []
    FIGURES["bombs tried"] += 1


@pytest.mark.parametrize("fmt", ["parquet", "txt"])
def test_an_upload_that_inflates_past_the_cap_ends_error_in_the_worker(caps, fmt):
    data = many_rows(fmt, 40, 900 * 1024) if fmt == "parquet" else many_rows(fmt, 40, 900 * 1024)
    if fmt == "parquet":
        assert len(data) < 64 * 1024  # a few KB that inflate to 36 MB
    row = upload(f"bomb.{fmt}", data)
    assert row.status == DatasetStatus.QUEUED  # not normalized in the request past 4 MB
    tasks.dataset_normalize_task(row.pk)
    row.refresh_from_db()
    assert row.status == DatasetStatus.ERROR
    assert "MISTUDIO_DATASET_INFLATED_MAX_MB" in row.error_message
    assert files_left(caps) == []
    FIGURES["bombs tried"] += 1


def test_the_issue_576_byte_parquet_is_handed_to_the_worker_and_capped(caps):
    data = parquet_bomb(1024, 4 * MB)  # 4 GB of text when expanded
    assert len(data) < 4096
    caps.DATASET_ROW_MAX_BYTES = 8 * MB
    row = upload("bomb.parquet", data)
    assert row.status == DatasetStatus.QUEUED
    tasks.dataset_normalize_task(row.pk)
    row.refresh_from_db()
    assert row.status == DatasetStatus.ERROR and "inflate" in row.error_message
    assert files_left(caps) == []


@pytest.mark.parametrize(
    "name, data",
    [
        ("data/train.jsonl.gz", gzip.compress(b'{"text": "' + b"c" * (3 * MB) + b'"}\n')),
        ("data/train.txt.gz", gzip.compress(b"d" * (3 * MB) + b"\n")),
        ("data/train.csv.gz", gzip.compress(b"text\n" + b"e" * (3 * MB) + b"\n")),
        ("data/train.parquet", parquet_bomb(2, 3 * MB)),
        ("data/train.jsonl.gz", gzip.compress((b'{"text": "' + b"f" * 100 + b'"}\n') * 300_000)),
    ],
    ids=["jsonl-gz-one-line", "txt-gz-one-line", "csv-gz-one-cell", "parquet-row", "jsonl-gz-many"],
)
def test_a_bomb_from_the_hub_ends_error_and_leaves_nothing(caps, hub, name, data):
    repo_id = f"bombs/{name.rsplit('/', 1)[1].replace('.', '-')}-{len(data)}"
    hub.add_dataset(repo_id, {name: data})
    row = services.dataset_import(hf_dataset_id=repo_id, text_field="text")
    tasks.dataset_import_task(row.pk)
    row.refresh_from_db()
    assert row.status == DatasetStatus.ERROR, row.error_message
    assert "MISTUDIO_DATASET_ROW_MAX_MB" in row.error_message or (
        "MISTUDIO_DATASET_INFLATED_MAX_MB" in row.error_message
    )
    assert files_left(caps) == []
    FIGURES["bombs tried"] += 1
