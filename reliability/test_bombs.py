"""Decompression bombs in every accepted format, uploaded and from the Hub: a row over the row
cap or a dataset that inflates past the inflated-size cap ends `error` (or a 4xx for an upload
refused by the request's check of its first rows) with a message naming the cap, and no file is
left. No request normalizes: the web server answers a bomb `queued` after reading a few rows,
its memory and the bytes it writes measured here (not its time); the worker then ends it. Peak
memory of the same bombs at full size is measured in benchmarks/hostile_input.py."""

from __future__ import annotations

import gzip
import io
import re
from pathlib import Path

import httpx
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from datasets_app import services, tasks
from datasets_app.models import Dataset, DatasetStatus
from datasets_app.tests.helpers import parquet_bytes, worker_ended
from mistudio.errors import Invalid
from mistudio.testing.live import LiveStack
from mistudio.testing.queues import queues_purge

from .conftest import FIGURES, figure_max

pytestmark = pytest.mark.django_db(transaction=True)

MB = 1024 * 1024


@pytest.fixture
def caps(settings):
    """Small caps so that the bombs stay small: 1 MB rows, 24 MB in all."""
    settings.DATASET_ROW_MAX_BYTES = 1 * MB
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


@pytest.mark.parametrize("fmt", ["parquet", "txt", "jsonl", "csv"])
def test_an_upload_that_inflates_past_the_cap_ends_error_in_the_worker(caps, fmt):
    data = many_rows(fmt, 40, 900 * 1024)  # 36 MB of texts, rows under the row cap
    if fmt == "parquet":
        assert len(data) < 64 * 1024  # a few KB that inflate to 36 MB
    row = upload(f"bomb.{fmt}", data)
    assert row.status == DatasetStatus.QUEUED  # the request read a few rows, normalized none
    assert [p.name for p in files_left(caps)] == [f"upload.{fmt}"]
    row = worker_ended(row.pk)
    assert row.status == DatasetStatus.ERROR
    assert "MISTUDIO_DATASET_INFLATED_MAX_MB" in row.error_message and "24 MB" in row.error_message
    assert files_left(caps) == [] and not (caps.DATASETS_DIR / row.pk).exists()
    FIGURES["bombs tried"] += 1


def test_the_issue_576_byte_parquet_is_handed_to_the_worker_and_capped(caps):
    data = parquet_bomb(1024, 4 * MB)  # 4 GB of text when expanded
    assert len(data) < 4096
    caps.DATASET_ROW_MAX_BYTES = 8 * MB
    row = upload("bomb.parquet", data)
    assert row.status == DatasetStatus.QUEUED
    row = worker_ended(row.pk)
    assert row.status == DatasetStatus.ERROR and "inflate" in row.error_message
    assert files_left(caps) == []


def _peak_reset(pid: int) -> int:
    """Reset the process's peak RSS (VmHWM) to its current RSS; return that RSS in bytes."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    return psutil.Process(pid).memory_info().rss


def _peak(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024


def _post(http: httpx.Client, name: str, data: bytes) -> httpx.Response:
    token = http.cookies["csrftoken"]
    files = {"file": (name, data, "application/octet-stream")}
    return http.post("/api/datasets", files=files, headers={"X-CSRFToken": token})


def test_the_web_server_answers_a_bomb_queued_without_normalizing_it(caps, hub):
    """The issue's parquet (1,024 rows × 4 MiB: 4 GB of texts) through the real web server: the
    request reads its first rows only, so the server's peak RSS grows by a small fraction of a
    single cap and it writes about the file's own size (normalizing would write texts.jsonl);
    the worker then ends it `error` at the inflated cap, with no folder left."""
    bomb = parquet_bomb(1024, 4 * MB)
    caps.DATASET_ROW_MAX_BYTES = 8 * MB
    queues_purge()
    env = {"MISTUDIO_DATASET_ROW_MAX_MB": "8", "MISTUDIO_DATASET_INFLATED_MAX_MB": "24"}
    with (
        LiveStack(hub.endpoint, extra_env=env, clusters=False) as web,
        httpx.Client(base_url=web.url, timeout=300) as http,
    ):
        http.get("/datasets/")
        warm = _post(http, "warm.parquet", parquet_bytes({"text": ["warm-up"] * 10}))
        assert warm.status_code == 202, warm.text  # pyarrow and the upload path are loaded
        pid = web.procs["web"].pid
        rss = _peak_reset(pid)
        wrote = psutil.Process(pid).io_counters().write_chars
        r = _post(http, "bomb.parquet", bomb)
        grew = _peak(pid) - rss
        written = psutil.Process(pid).io_counters().write_chars - wrote
    assert r.status_code == 202 and r.json()["status"] == "queued", r.text
    row_id = r.json()["id"]
    assert [p.name for p in (caps.DATASETS_DIR / row_id).iterdir()] == ["upload.parquet"]
    figure_max("web server peak RSS growth answering a 4 GB parquet bomb (MB)", grew / MB)
    figure_max("bytes the web server wrote answering it (KB)", written / 1024)
    assert grew < 64 * MB, grew / MB  # < the 64 MB the request once normalized, << 4 GB
    assert written < 1 * MB, written  # the stored file, the row and a log line: no texts
    row = worker_ended(row_id)
    assert row.status == DatasetStatus.ERROR and "MISTUDIO_DATASET_INFLATED_MAX_MB" in (
        row.error_message
    )
    assert not (caps.DATASETS_DIR / row_id).exists()
    FIGURES["bombs tried"] += 1


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
