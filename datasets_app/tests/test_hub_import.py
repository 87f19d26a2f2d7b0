"""Hub imports against the loopback fake hub: split layouts, progress, refusals, cancel, tokens."""

from __future__ import annotations

import pytest

from conftest import GOOD_TOKEN
from datasets_app import services, tasks
from datasets_app.hubdata import split_files
from datasets_app.models import Dataset, DatasetCredential, DatasetStatus
from datasets_app.reconcile import datasets_reconcile
from mistudio.errors import Conflict
from mistudio.hub import HubError, RepoFile
from mistudio.testing.queues import queued_task_payloads

from .helpers import BIG_ROWS, files_under, hub_import, in_thread, story, wait_for

pytestmark = pytest.mark.django_db(transaction=True)


def test_a_parquet_split_in_several_shards_becomes_one_dataset(dhub, settings):
    row = hub_import("tiny/wiki")
    assert row.status == DatasetStatus.READY, row.error_message
    assert (row.row_count, row.name, row.file_format) == (30, "tiny/wiki (train)", "parquet")
    assert [f["name"] for f in row.files] == [
        "data/train-00000-of-00002.parquet",
        "data/train-00001-of-00002.parquet",
    ]
    assert row.preview[0] == story(0) and len(row.preview) == 5
    assert len(row.commit_sha) == 40 and row.progress == 100.0
    assert files_under(settings.DATASETS_DIR / row.id) == ["texts.jsonl"]  # downloads removed
    assert list(services.dataset_texts(row.id))[-1] == story(29)


def test_another_split_and_field_of_a_jsonl_repo(dhub):
    row = hub_import("tiny/stories", split="validation", text_field="story")
    assert (row.status, row.row_count, row.preview) == ("ready", 1, ["held out"])
    assert hub_import("tiny/wiki", split="test").preview == ["a test row"]


def test_a_repo_without_split_names_is_all_train(dhub):
    row = hub_import("tiny/one-csv", name="csv rows")
    assert (row.status, row.preview) == ("ready", ["first row", "second, quoted"])


@pytest.mark.parametrize(
    ("repo", "kwargs", "status", "words"),
    [
        ("tiny/gated-data", {}, 403, "accept its conditions at"),
        ("tiny/gated-data", {"access_token": "hf_unapprovedtoken1234567890"}, 403, "gated"),
        ("tiny/wiki", {"access_token": "hf_notavalidtoken000"}, 401, "token is invalid"),
        ("tiny/missing", {}, 404, "not found"),
        ("tiny/llama", {}, 404, "not found"),  # a model repo is not a dataset repo
        ("tiny/wiki", {"revision": "v9"}, 404, "no such revision"),
        ("tiny/wiki", {"split": "validation"}, 422, "splits found: train, test"),
        ("tiny/no-data", {}, 422, "no data files"),
    ],
)
def test_hub_refusals_give_clear_messages_and_change_nothing(
    dhub, settings, repo, kwargs, status, words
):
    with pytest.raises(HubError) as err:
        services.dataset_import(hf_dataset_id=repo, **kwargs)
    assert err.value.status == status and words in err.value.message
    assert Dataset.objects.count() == 0 and files_under(settings.DATASETS_DIR) == []


def test_a_gated_dataset_imports_with_an_approved_token_which_is_then_gone(dhub):
    row = services.dataset_import(hf_dataset_id="tiny/gated-data", access_token=GOOD_TOKEN)
    cred = DatasetCredential.objects.get()
    assert GOOD_TOKEN.encode() not in bytes(cred.ciphertext)
    payloads = repr(queued_task_payloads())
    assert row.id in payloads and GOOD_TOKEN not in payloads
    tasks.dataset_import_task(row.id)
    row.refresh_from_db()
    assert row.status == DatasetStatus.READY, row.error_message
    assert not DatasetCredential.objects.exists()


def test_progress_is_monotonic_and_ends_at_100(dhub):
    dhub.set_rate(3_000_000)  # ~2.4 MB: under a second of download, then normalizing
    row = services.dataset_import(hf_dataset_id="tiny/big")
    worker = in_thread(tasks.dataset_import_task, row.id)
    seen = []
    while worker.is_alive():
        r = Dataset.objects.get(pk=row.id)
        seen.append((r.progress, r.phase.split(" ")[0]))
    worker.join()
    final = Dataset.objects.get(pk=row.id)
    assert final.status == DatasetStatus.READY, final.error_message
    progress = [p for p, _ in seen]
    assert progress == sorted(progress), "progress never goes back"
    assert len(set(progress)) > 5 and {"downloading", "normalizing"} <= {ph for _, ph in seen}
    assert (final.progress, final.row_count) == (100.0, BIG_ROWS)
    assert final.bytes_done == final.bytes_total > 0


def test_cancel_mid_download_leaves_no_partial_files(dhub, settings):
    dhub.pause(after_bytes=1_500_000)  # hold the body after the first 1 MiB chunk arrived
    row = services.dataset_import(hf_dataset_id="tiny/big")
    worker = in_thread(tasks.dataset_import_task, row.id)
    assert dhub.wait_until_held()
    wait_for(lambda: Dataset.objects.get(pk=row.id).bytes_done > 0)  # the first MiB is in
    partial = files_under(settings.DATASETS_DIR / row.id)
    assert any(name.endswith(".incomplete") for name in partial), partial
    services.dataset_cancel(row.id)
    dhub.resume()
    worker.join(timeout=300)
    row.refresh_from_db()
    assert (row.status, row.error_message) == ("cancelled", "Cancelled by the user.")
    assert 0 < row.bytes_done < row.bytes_total
    assert files_under(settings.DATASETS_DIR) == []
    with pytest.raises(Conflict):
        services.dataset_cancel(row.id)


def test_a_bad_file_on_the_hub_fails_the_job_with_its_line(dhub, settings):
    row = hub_import("tiny/bad-field")
    assert row.status == DatasetStatus.ERROR
    assert row.error_message == "train.jsonl: Line 2 has no field 'text' (its fields: body)."
    assert files_under(settings.DATASETS_DIR) == []


def test_a_dataset_that_became_gated_fails_the_job_readably(dhub, settings):
    row = services.dataset_import(hf_dataset_id="tiny/wiki", name="soon gated")
    dhub.dataset_repos["tiny/wiki"].gated = True
    try:
        tasks.dataset_import_task(row.id)
    finally:
        dhub.dataset_repos["tiny/wiki"].gated = False
    row.refresh_from_db()
    assert row.status == DatasetStatus.ERROR and "gated" in row.error_message
    assert files_under(settings.DATASETS_DIR) == []


def test_second_delivery_does_nothing(dhub):
    row = hub_import("tiny/one-csv")
    tasks.dataset_import_task(row.id)
    assert Dataset.objects.get(pk=row.id).attempt == 1


def test_the_same_repo_and_split_twice_is_a_conflict(dhub):
    hub_import("tiny/one-csv")
    with pytest.raises(Conflict):
        services.dataset_import(hf_dataset_id="tiny/one-csv")


def test_delete_is_refused_while_importing_then_removes_the_files(dhub, settings):
    row = services.dataset_import(hf_dataset_id="tiny/one-csv")
    with pytest.raises(Conflict):
        services.dataset_delete(row.id)
    tasks.dataset_import_task(row.id)
    assert files_under(settings.DATASETS_DIR / row.id) == ["texts.jsonl"]
    services.dataset_delete(row.id)
    assert not Dataset.objects.exists() and files_under(settings.DATASETS_DIR) == []


def test_the_reconciler_ends_a_stale_import_and_removes_orphans(dhub, settings):
    from datetime import timedelta

    from django.utils import timezone

    row = services.dataset_import(hf_dataset_id="tiny/one-csv")
    assert Dataset.claim(row.id, from_status="queued", status="importing", phase="downloading")
    (settings.DATASETS_DIR / row.id / "raw").mkdir(parents=True)
    (settings.DATASETS_DIR / "d_orphan").mkdir()
    later = timezone.now() + timedelta(seconds=settings.STALE_HEARTBEAT_SECONDS + 5)
    assert datasets_reconcile(later) == 1
    row.refresh_from_db()
    assert row.status == DatasetStatus.ERROR and "worker stopped" in row.error_message
    assert list(settings.DATASETS_DIR.iterdir()) == []
    assert datasets_reconcile() == 0


def names(*paths: str) -> list[RepoFile]:
    return [RepoFile(p, 1) for p in paths]


@pytest.mark.parametrize(
    ("files", "split", "chosen"),
    [
        (
            ["data/train-00000-of-00001.parquet", "data/test-0.parquet"],
            "train",
            ["data/train-00000-of-00001.parquet"],
        ),
        (["train.jsonl", "train.parquet", "dev.jsonl"], "train", ["train.parquet"]),
        (["dev.jsonl", "train.jsonl"], "validation", ["dev.jsonl"]),
        (
            ["train/0001.parquet", "train/0000.parquet", "test/0.parquet"],
            "train",
            ["train/0000.parquet", "train/0001.parquet"],
        ),
        (
            ["en/c4-train.00000-of-01024.json.gz", "en/c4-validation.0.json.gz"],
            "train",
            ["en/c4-train.00000-of-01024.json.gz"],
        ),
        (["corpus.txt", "README.md", ".gitattributes"], "train", ["corpus.txt"]),
        (
            ["../evil/train.jsonl", "/abs/train.jsonl", "ok/train.jsonl"],
            "train",
            ["ok/train.jsonl"],
        ),
        (["pretrain.jsonl", "constrain.jsonl"], "train", ["pretrain.jsonl", "constrain.jsonl"]),
    ],
)
def test_split_files_follow_the_common_layouts(files, split, chosen):
    _, picked = split_files(names(*files), split, "o/d")
    assert sorted(f.name for f in picked) == sorted(chosen)
