"""Dataset rows: what a text dataset is, where it came from, and its import job's state.

Every dataset, whatever its source, ends as one file `<DATASETS_DIR>/<id>/texts.jsonl`
(one JSON string per line); the row holds its row count, size and a short preview.
"""

from __future__ import annotations

import uuid

from django.db import models
from django.db.models import Q

from mistudio.jobs import ByteCounts, Job
from mistudio.secretbox import SealedToken


def new_dataset_id() -> str:
    return f"d_{uuid.uuid4().hex}"


class DatasetSource(models.TextChoices):
    UPLOAD = "upload", "Upload"
    HUB = "hub", "Hugging Face Hub"


class DatasetStatus(models.TextChoices):
    QUEUED = "queued", "Queued"
    IMPORTING = "importing", "Importing"
    READY = "ready", "Ready"
    ERROR = "error", "Error"
    CANCELLED = "cancelled", "Cancelled"


ACTIVE_STATUSES = (DatasetStatus.QUEUED, DatasetStatus.IMPORTING)
FAILED_STATUSES = (DatasetStatus.ERROR, DatasetStatus.CANCELLED)


class Dataset(Job, ByteCounts):
    """A text dataset registered from an uploaded file or a Hub dataset repo split."""

    live_group = "datasets"
    active_statuses = ACTIVE_STATUSES

    id = models.CharField(primary_key=True, max_length=40, default=new_dataset_id, editable=False)
    name = models.CharField(max_length=200)
    source = models.CharField(max_length=8, choices=DatasetSource.choices)
    # Upload: the file's name and format; Hub: repo, split, revision and the commit fetched.
    original_filename = models.CharField(max_length=255, blank=True)
    file_format = models.CharField(max_length=16, blank=True)
    hf_dataset_id = models.CharField(max_length=96, blank=True)
    split = models.CharField(max_length=64, blank=True)
    revision = models.CharField(max_length=255, blank=True)
    commit_sha = models.CharField(max_length=40, blank=True)
    text_field = models.CharField(max_length=200, blank=True)
    files = models.JSONField(default=list, blank=True)

    status = models.CharField(
        max_length=16, choices=DatasetStatus.choices, default=DatasetStatus.QUEUED, db_index=True
    )

    # The normalized file: rows kept (empty rows skipped), its size in bytes, the first texts.
    row_count = models.BigIntegerField(default=0)
    size_bytes = models.BigIntegerField(default=0)
    preview = models.JSONField(default=list, blank=True)

    class Meta(Job.Meta):
        db_table = "datasets"
        ordering = ["-created_at"]
        constraints = [
            *Job.Meta.constraints,
            # Names tell datasets apart in the extraction form; failed rows free their name.
            models.UniqueConstraint(
                fields=["name"],
                condition=~Q(status__in=["error", "cancelled"]),
                name="unique_live_dataset_name",
            ),
            models.CheckConstraint(
                condition=Q(source__in=["upload", "hub"]), name="known_dataset_source"
            ),
        ]

    def __str__(self) -> str:
        return self.name


class DatasetCredential(SealedToken):
    """The access token of one Hub import (see SealedToken)."""

    dataset = models.OneToOneField(Dataset, on_delete=models.CASCADE, related_name="credential")

    class Meta:
        db_table = "dataset_credentials"
