"""Helpers shared by the model tests (no mocks: they drive the real services and tasks)."""

from __future__ import annotations

from datasets_app.tests.helpers import upload_ready
from mistudio.testing.waiting import in_thread, wait_for  # noqa: F401 - re-exported
from models_app import extraction, services, tasks
from models_app.models import ACTIVE_STATUSES, EXTRACTION_ACTIVE, ExtractionJob, Model


def download(repo_id: str, quantization: str = "FP16", token: str | None = None) -> Model:
    """Request a download and run its tasks inline (as the two clusters would); return the row."""
    row = services.model_download(hf_repo_id=repo_id, quantization=quantization, access_token=token)
    tasks.model_download_task(row.pk)
    tasks.model_load_check_task(row.pk)
    # With a live stack its clusters may have taken a step first (each runs once): wait for them.
    return wait_for(
        lambda: Model.objects.exclude(status__in=ACTIVE_STATUSES).filter(pk=row.pk).first(),
        timeout=600,
        every=0.05,
    )


def cache_files(settings) -> list[str]:
    root = settings.MODELS_CACHE_DIR
    return (
        sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
        if root.exists()
        else []
    )


CORPUS = [
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun.",
    "A language model reads a sequence of tokens and predicts the next token in the text.",
    "Researchers study the residual stream of a transformer to find features.",
    "Sparse autoencoders learn a dictionary of directions from the activations of one layer.",
    "When the weather is fine we walk along the river and count the boats that pass by.",
] * 20


def text_dataset(name: str = "corpus", lines: list[str] | None = None):
    """A ready dataset registered through the real upload service and normalized by the
    worker's task (datasets_app.tests.helpers.upload_ready)."""
    return upload_ready(f"{name}.txt", "\n".join(lines or CORPUS).encode(), name=name)


def extract(model: Model, dataset, **overrides):
    """Start an extraction through the service and run its GPU task inline; return the row."""
    params = {
        "layers": [0, 1],
        "hook_types": ["residual", "mlp", "attention"],
        "batch_size": 4,
        "max_samples": 12,
        "context_size": 32,
        **overrides,
    }
    job = extraction.extraction_start(model_id=model.pk, dataset_id=dataset.pk, **params)
    tasks.extraction_run_task(job.pk)
    ended = ExtractionJob.objects.exclude(status__in=EXTRACTION_ACTIVE)
    return wait_for(  # a live stack's GPU worker may have taken it first
        lambda: ended.filter(pk=job.pk).first(),
        timeout=600,
        every=0.05,
    )


def cancel_when_asked(hub, name: str, model_id: str) -> list[str]:
    """Make the fake hub cancel download `model_id` (through the service, as the API does) the
    first time the body of file `name` is asked for; returns a list that then holds `name`."""
    asked: list[str] = []

    def cancel(path: str) -> None:
        if path == name and not asked:
            asked.append(path)
            services.model_cancel(model_id)

    hub.on_body(cancel)
    return asked
