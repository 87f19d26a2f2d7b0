"""Helpers shared by the dataset tests (no mocks: they drive the real services and tasks)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from django.core.files.uploadedfile import SimpleUploadedFile

from datasets_app import services, tasks
from datasets_app.models import ACTIVE_STATUSES, Dataset, DatasetStatus
from mistudio.testing.waiting import in_thread, wait_for  # noqa: F401 - in_thread re-exported

BIG_ROWS = 40_000  # ~2.4 MB of JSON Lines: long enough to watch progress at a throttled rate


def parquet_bytes(
    columns: dict[str, list], row_group_size: int | None = None, compression: str = "snappy"
) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.table(columns), buf, row_group_size=row_group_size, compression=compression)
    return buf.getvalue()


def jsonl_bytes(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def story(i: int) -> str:
    return f"Story {i}: once upon a time a small model read {i} words and learned a little."


def hub_catalogue() -> dict[str, tuple[dict[str, bytes], bool]]:
    """repo id → (files, gated) for the dataset repos the tests import."""
    train = [story(i) for i in range(30)]
    big = jsonl_bytes([{"text": story(i)} for i in range(BIG_ROWS)])
    return {
        "tiny/wiki": (
            {
                "README.md": b"# tiny wiki\n",
                "data/train-00000-of-00002.parquet": parquet_bytes({"text": train[:20]}),
                "data/train-00001-of-00002.parquet": parquet_bytes({"text": ["", *train[20:]]}),
                "data/test-00000-of-00001.parquet": parquet_bytes({"text": ["a test row"]}),
            },
            False,
        ),
        "tiny/stories": (
            {
                "train.jsonl": jsonl_bytes([{"story": s, "id": i} for i, s in enumerate(train)]),
                "validation.jsonl": jsonl_bytes([{"story": "held out"}]),
            },
            False,
        ),
        "tiny/one-csv": ({"data.csv": b'id,text\n1,first row\n2,"second, quoted"\n'}, False),
        "tiny/big": ({"data/train-00000-of-00001.jsonl": big}, False),
        "tiny/bad-field": ({"train.jsonl": b'{"text": "ok"}\n{"body": "no text"}\n'}, False),
        "tiny/no-data": ({"README.md": b"nothing here\n"}, False),
        "tiny/gated-data": ({"train.jsonl": jsonl_bytes([{"text": "secret"}])}, True),
    }


def upload(filename: str, content: bytes, **kwargs) -> Dataset:
    """Register `content` as an uploaded file named `filename`; returns the `queued` row the
    request answers with (no worker has run)."""
    return services.dataset_upload(upload=SimpleUploadedFile(filename, content), **kwargs)


def worker_ended(dataset_id: str) -> Dataset:
    """Run the upload's task inline, as the download cluster would, and wait (generously) until
    the row is ready, error or cancelled; return it. With a live stack its cluster may have
    taken the task first: the job's exactly-once claim makes this call a no-op; the wait holds."""
    tasks.dataset_normalize_task(dataset_id)
    ended = Dataset.objects.exclude(status__in=ACTIVE_STATUSES)
    return wait_for(lambda: ended.filter(pk=dataset_id).first(), timeout=600, every=0.02)


def upload_ready(filename: str, content: bytes, **kwargs) -> Dataset:
    """Upload through the service, let the worker normalize it, and return the `ready` row (the
    one helper every test uses for a dataset it needs ready)."""
    row = worker_ended(upload(filename, content, **kwargs).pk)
    assert row.status == DatasetStatus.READY, (row.status, row.error_message)
    return row


def hub_import(repo_id: str, **kwargs) -> Dataset:
    """Request a Hub import and run its task inline (as the worker would); return the row."""
    row = services.dataset_import(hf_dataset_id=repo_id, **kwargs)
    tasks.dataset_import_task(row.pk)
    return Dataset.objects.get(pk=row.pk)


def files_under(root: Path) -> list[str]:
    """Every file below `root` (relative paths), [] when it does not exist."""
    if not root.exists():
        return []
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
