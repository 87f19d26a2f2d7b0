"""Model rows: the DB row is the truth for every download's status and progress."""

from __future__ import annotations

import uuid
from functools import lru_cache

from django.db import models
from django.db.models import Q
from django.urls import reverse

from mistudio import limits
from mistudio.jobs import ByteCounts, Job
from mistudio.secretbox import SealedToken

from .ml.folders import datasets_folder_whole


def new_model_id() -> str:
    return f"m_{uuid.uuid4().hex}"


class Quantization(models.TextChoices):
    FP16 = "FP16", "FP16 (Full Precision)"
    Q8 = "Q8", "Q8 (8-bit)"
    Q4 = "Q4", "Q4 (4-bit)"
    Q2 = "Q2", "Q2 (2-bit)"


class ModelStatus(models.TextChoices):
    QUEUED = "queued", "Queued"
    DOWNLOADING = "downloading", "Downloading"
    QUANTIZING = "quantizing", "Quantizing"
    READY = "ready", "Ready"
    ERROR = "error", "Error"
    CANCELLED = "cancelled", "Cancelled"


ACTIVE_STATUSES = (ModelStatus.QUEUED, ModelStatus.DOWNLOADING, ModelStatus.QUANTIZING)
FAILED_STATUSES = (ModelStatus.ERROR, ModelStatus.CANCELLED)


@lru_cache(maxsize=1)
def _models_root() -> str:
    return reverse("models:page")


class Model(Job, ByteCounts):
    """A Hugging Face model downloaded at one quantization."""

    live_group = "models"
    active_statuses = ACTIVE_STATUSES

    id = models.CharField(primary_key=True, max_length=40, default=new_model_id, editable=False)
    name = models.CharField(max_length=200)
    hf_repo_id = models.CharField(max_length=96)
    revision = models.CharField(max_length=255, default="main")
    commit_sha = models.CharField(max_length=40, blank=True)
    quantization = models.CharField(max_length=4, choices=Quantization.choices)

    status = models.CharField(
        max_length=16, choices=ModelStatus.choices, default=ModelStatus.QUEUED, db_index=True
    )

    # Files: the snapshot folder inside the HF cache and the list of files we fetched.
    local_path = models.CharField(max_length=1000, blank=True)
    files = models.JSONField(default=list, blank=True)
    size_bytes = models.BigIntegerField(default=0)

    # What the load check really found.
    params = models.BigIntegerField(null=True, blank=True)
    num_layers = models.PositiveIntegerField(null=True, blank=True)
    hidden_dim = models.PositiveIntegerField(null=True, blank=True)
    num_heads = models.PositiveIntegerField(null=True, blank=True)
    vocab_size = models.PositiveIntegerField(null=True, blank=True)
    max_position = models.PositiveIntegerField(null=True, blank=True)
    architecture = models.CharField(max_length=120, blank=True)
    dtype = models.CharField(max_length=32, blank=True)
    quant_backend = models.CharField(max_length=40, blank=True)
    mem_req_bytes = models.BigIntegerField(null=True, blank=True)
    mem_estimate_bytes = models.BigIntegerField(null=True, blank=True)
    load_notice = models.CharField(max_length=500, blank=True)
    metadata = models.JSONField(default=dict, blank=True)

    is_loaded = models.BooleanField(default=False)
    loaded_device = models.CharField(max_length=32, blank=True)

    class Meta(Job.Meta):
        db_table = "models"
        ordering = ["-created_at"]
        constraints = [
            *Job.Meta.constraints,
            # One live download per repo and quantization; failed or cancelled rows may be retried.
            models.UniqueConstraint(
                fields=["hf_repo_id", "quantization"],
                condition=~Q(status__in=["error", "cancelled"]),
                name="unique_live_repo_quantization",
            ),
            models.CheckConstraint(
                condition=Q(quantization__in=["FP16", "Q8", "Q4", "Q2"]),
                name="known_quantization",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.hf_repo_id} [{self.quantization}]"

    @property
    def url_base(self) -> str:
        """`/models/<id>/`: card actions append their name. One reverse() per process instead of
        eight per card keeps a 500-model page fast."""
        return f"{_models_root()}{self.pk}/"


class HubCredential(SealedToken):
    """The access token of one model download (see SealedToken)."""

    model = models.OneToOneField(Model, on_delete=models.CASCADE, related_name="credential")

    class Meta:
        db_table = "hub_credentials"


def new_extraction_id() -> str:
    return f"x_{uuid.uuid4().hex}"


class ExtractionStatus(models.TextChoices):
    QUEUED = "queued", "Queued"
    RUNNING = "running", "Running"
    COMPLETED = "completed", "Completed"
    FAILED = "failed", "Failed"
    CANCELLED = "cancelled", "Cancelled"


EXTRACTION_ACTIVE = (ExtractionStatus.QUEUED, ExtractionStatus.RUNNING)


class ExtractionJob(Job):
    """One activation extraction: sites × dataset → shards + manifest under the data dir.

    Its progress shows on its model's card, so changes are announced as the model's."""

    live_group = "models"
    active_statuses = EXTRACTION_ACTIVE

    id = models.CharField(
        primary_key=True, max_length=40, default=new_extraction_id, editable=False
    )
    model = models.ForeignKey(Model, on_delete=models.CASCADE, related_name="extractions")
    # The dataset read; null once the dataset is deleted (its name stays for the history).
    dataset = models.ForeignKey(
        "datasets_app.Dataset",
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="extractions",
    )
    dataset_name = models.CharField(max_length=255, blank=True)
    layers = models.JSONField()
    hook_types = models.JSONField()
    # advanced sites: [{"path": "model.layers.3.mlp.down_proj", "io": "output"}, …]
    module_sites = models.JSONField(default=list, blank=True)
    batch_size = models.PositiveIntegerField()
    batch_size_used = models.PositiveIntegerField(null=True, blank=True)
    max_samples = models.PositiveIntegerField()
    context_size = models.PositiveIntegerField()
    # Special-token strings in the texts: plain text or parsed (limits.SPECIAL_TOKENS)
    special_tokens = models.CharField(
        max_length=8,
        choices=[(v, v) for v in limits.SPECIAL_TOKENS],
        default=limits.DEFAULT_SPECIAL_TOKENS,
    )
    # safetensors shards only, or also a SAELens `datasets` folder (limits.OUTPUT_FORMATS)
    output_format = models.CharField(
        max_length=24,
        choices=list(limits.OUTPUT_FORMAT_LABELS.items()),
        default=limits.DEFAULT_OUTPUT_FORMAT,
    )

    status = models.CharField(
        max_length=16,
        choices=ExtractionStatus.choices,
        default=ExtractionStatus.QUEUED,
        db_index=True,
    )
    tokens_done = models.BigIntegerField(default=0)
    tokens_total = models.BigIntegerField(default=0)
    tokens_per_second = models.FloatField(default=0.0)

    output_path = models.CharField(max_length=1000, blank=True)
    bytes_written = models.BigIntegerField(default=0)
    manifest = models.JSONField(null=True, blank=True)
    statistics = models.JSONField(null=True, blank=True)

    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta(Job.Meta):
        db_table = "extraction_jobs"
        ordering = ["-created_at"]
        constraints = [
            *Job.Meta.constraints,
            models.CheckConstraint(
                condition=Q(batch_size__gte=1) & Q(max_samples__gte=1) & Q(context_size__gte=2),
                name="extraction_sizes_positive",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.id} on {self.model_id}"

    @classmethod
    def card_ids(cls, pk: str) -> list[str]:
        return list(cls.objects.filter(pk=pk).values_list("model_id", flat=True))

    @property
    def saelens_export(self) -> ExtractionExport | None:
        """This extraction's SAELens export (written by the job or by Export), or None."""
        try:
            return self.export
        except ExtractionExport.DoesNotExist:
            return None


class ExtractionPart(models.Model):
    """A range of whole shards of one extraction, run by one GPU worker at a time.

    A worker takes a part with a conditional UPDATE (queued, or running with a stale heartbeat:
    its worker died), so two workers never hold the same part. `shards_done` counts the part's
    shards on disk (verified by sha256 on resume); `batches` counts every batch forwarded for
    it, so work recomputed after a crash is batches − the part's batches of one clean run."""

    class Status(models.TextChoices):
        QUEUED = "queued", "Queued"
        RUNNING = "running", "Running"
        COMPLETED = "completed", "Completed"
        FAILED = "failed", "Failed"
        CANCELLED = "cancelled", "Cancelled"

    extraction = models.ForeignKey(ExtractionJob, on_delete=models.CASCADE, related_name="parts")
    index = models.PositiveIntegerField()
    shard_start = models.PositiveIntegerField()  # first shard, inclusive
    shard_end = models.PositiveIntegerField()  # last shard, exclusive
    tokens_total = models.BigIntegerField(default=0)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.QUEUED)
    device = models.CharField(max_length=40, blank=True)  # e.g. cuda:1, cpu:0
    worker = models.CharField(max_length=200, blank=True)  # host:pid of the worker holding it
    shards_done = models.PositiveIntegerField(default=0)
    tokens_done = models.BigIntegerField(default=0)
    tokens_per_second = models.FloatField(default=0.0)
    batches = models.PositiveIntegerField(default=0)  # forwarded, over every attempt
    attempts = models.PositiveIntegerField(default=0)  # times a worker took it
    crashes = models.PositiveIntegerField(default=0)  # times its worker died or it raised
    last_error = models.TextField(blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        db_table = "extraction_parts"
        ordering = ["extraction", "index"]
        constraints = [
            models.UniqueConstraint(fields=["extraction", "index"], name="extraction_part_unique")
        ]

    def __str__(self) -> str:
        return f"{self.extraction_id} part {self.index}"

    @property
    def n_shards(self) -> int:
        return self.shard_end - self.shard_start


class ExtractionExport(Job):
    """The SAELens `datasets` folder of one completed extraction, at `<output_path>/saelens`:
    written at the end of the extraction job (output_format safetensors+saelens) or afterwards by
    a background export. Its progress shows on the extraction's model card."""

    live_group = "models"
    active_statuses = EXTRACTION_ACTIVE

    extraction = models.OneToOneField(
        ExtractionJob, on_delete=models.CASCADE, primary_key=True, related_name="export"
    )
    format = models.CharField(max_length=16, default="saelens")
    status = models.CharField(
        max_length=16,
        choices=ExtractionStatus.choices,
        default=ExtractionStatus.QUEUED,
        db_index=True,
    )
    path = models.CharField(max_length=1000, blank=True)
    bytes_written = models.BigIntegerField(default=0)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta(Job.Meta):
        db_table = "extraction_exports"

    def __str__(self) -> str:
        return f"{self.format} export of {self.extraction_id}"

    @property
    def missing(self) -> bool:
        """A completed export whose folder is gone from disk (removed by hand) or incomplete:
        not exported any more; the card and the API say so, and it may be exported again."""
        return self.status == ExtractionStatus.COMPLETED and not datasets_folder_whole(self.path)

    @classmethod
    def card_ids(cls, pk: str) -> list[str]:
        rows = cls.objects.filter(pk=pk).values_list("extraction__model_id", flat=True)
        return list(rows)


def new_push_id() -> str:
    return f"p_{uuid.uuid4().hex}"


class PushStatus(models.TextChoices):
    QUEUED = "queued", "Queued"
    RUNNING = "running", "Pushing"
    COMPLETED = "completed", "Completed"
    FAILED = "failed", "Failed"


PUSH_ACTIVE = (PushStatus.QUEUED, PushStatus.RUNNING)


class PushJob(Job, ByteCounts):
    """One push of a completed extraction to a Hub dataset repo (manifest, shards, card).

    Its progress shows with its extraction on the model's card and Extractions page, so changes
    are announced as the model's. The access token is never a column: see PushCredential."""

    live_group = "models"
    active_statuses = PUSH_ACTIVE

    id = models.CharField(primary_key=True, max_length=40, default=new_push_id, editable=False)
    extraction = models.ForeignKey(ExtractionJob, on_delete=models.CASCADE, related_name="pushes")
    repo_id = models.CharField(max_length=96)
    private = models.BooleanField(default=True)
    status = models.CharField(
        max_length=16, choices=PushStatus.choices, default=PushStatus.QUEUED, db_index=True
    )
    repo_url = models.CharField(max_length=500, blank=True)
    commit_sha = models.CharField(max_length=40, blank=True)
    files_total = models.PositiveIntegerField(default=0)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta(Job.Meta):
        db_table = "push_jobs"
        ordering = ["-created_at"]
        constraints = [
            *Job.Meta.constraints,
            # One live push per extraction; ended ones stay as history.
            models.UniqueConstraint(
                fields=["extraction"],
                condition=Q(status__in=["queued", "running"]),
                name="one_live_push_per_extraction",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.extraction_id} → {self.repo_id}"

    @classmethod
    def card_ids(cls, pk: str) -> list[str]:
        return list(cls.objects.filter(pk=pk).values_list("extraction__model_id", flat=True))


class PushCredential(SealedToken):
    """The access token of one push (see SealedToken): sealed until the push ends."""

    push = models.OneToOneField(PushJob, on_delete=models.CASCADE, related_name="credential")

    class Meta:
        db_table = "push_credentials"
