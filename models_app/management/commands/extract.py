"""Extract activations from the command line, with the same services and validation as the app.

    python manage.py extract --model <id or repo> --dataset <id, name or file> --layers 0,5,11 \
        --hooks residual,mlp --max-samples N --batch-size B --context-size T \
        [--template NAME] [--out DIR] [--quantization Q4] [--text-field text]

Runs in this process with a tqdm progress bar; exits non-zero with a message on bad input or a
failed job.
"""

from __future__ import annotations

import threading
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError
from pydantic import ValidationError
from tqdm import tqdm

from mistudio.errors import ServiceError
from mistudio.validation import validation_message
from models_app import extraction
from models_app.models import ExtractionJob, ExtractionStatus, Model, ModelStatus
from models_app.schemas import ExtractionIn

POLL_SECONDS = 0.2


def _int_list(raw: str) -> list[str]:
    return [part.strip() for part in raw.split(",") if part.strip()]


def model_resolve(ref: str, quantization: str | None) -> Model:
    """A model by id, or by repo id among the ready models (quantization picks among several)."""
    row = Model.objects.filter(pk=ref).first()
    if row:
        return row
    rows = Model.objects.filter(hf_repo_id=ref, status=ModelStatus.READY)
    if quantization:
        rows = rows.filter(quantization=quantization)
    rows = list(rows)
    if not rows:
        raise CommandError(
            f"No ready model {ref!r}; download it first (manage.py shows ids in"
            " the app or GET /api/models)."
        )
    if len(rows) > 1:
        choices = ", ".join(f"{r.quantization} ({r.pk})" for r in rows)
        raise CommandError(
            f"{ref} is downloaded at several quantizations: {choices}."
            " Pass --quantization or a model id."
        )
    return rows[0]


def _free_name(stem: str) -> str:
    from datasets_app.services import dataset_named

    name, n = stem, 1
    while dataset_named(name):
        n += 1
        name = f"{stem} ({n})"
    return name


def dataset_resolve(ref: str, text_field: str | None) -> str:
    """A dataset id, the name shown on the Datasets page, or a local file registered as a new
    dataset (same parser as uploads)."""
    from django.core.files import File

    from datasets_app.models import Dataset
    from datasets_app.services import dataset_named, dataset_upload

    if Dataset.objects.filter(pk=ref).exists():
        return ref
    if named := dataset_named(ref):
        return named.pk  # not ready yet: the extraction request says so
    path = Path(ref).expanduser()
    if not path.is_file():
        raise CommandError(f"{ref!r} is neither a dataset id, a dataset name nor a file.")
    with path.open("rb") as fh:
        row = dataset_upload(
            upload=File(fh, name=path.name),
            text_field=text_field or "text",
            name=_free_name(path.stem),
        )
    if row.status != "ready":
        from datasets_app.jobs import dataset_normalize_run

        dataset_normalize_run(row.pk)  # a large file: normalize here, as the worker would
    return row.pk


def template_values(name: str | None) -> dict:
    if not name:
        return {}
    from templates_app.models import ExtractionTemplate

    t = ExtractionTemplate.objects.filter(name=name).first()
    if t is None:
        raise CommandError(f"No extraction template named {name!r}.")
    return {
        "layers": t.layers,
        "hook_types": t.hook_types,
        "batch_size": t.batch_size,
        "max_samples": t.max_samples,
        "context_size": t.context_size,
    }


class Command(BaseCommand):
    help = "Extract activations (residual / mlp / attention) from a model over a dataset."

    def add_arguments(self, parser):
        parser.add_argument("--model", required=True, help="model id (m_…) or repo id")
        parser.add_argument("--quantization", choices=["FP16", "Q8", "Q4", "Q2"])
        parser.add_argument("--dataset", required=True, help="dataset id (d_…), name or file")
        parser.add_argument("--text-field", help="field/column of .jsonl/.csv/.parquet files")
        parser.add_argument("--layers", help="comma-separated block indices, e.g. 0,5,11")
        parser.add_argument("--hooks", help="comma-separated: residual,mlp,attention")
        parser.add_argument("--max-samples", type=int)
        parser.add_argument("--batch-size", type=int)
        parser.add_argument("--context-size", type=int)
        parser.add_argument("--template", help="start from a saved extraction template")
        parser.add_argument("--out", help="output folder (new or empty); default: the data dir")

    def _request(self, options) -> ExtractionIn:
        values = template_values(options["template"])
        explicit = {
            "layers": _int_list(options["layers"]) if options["layers"] else None,
            "hook_types": _int_list(options["hooks"]) if options["hooks"] else None,
            "batch_size": options["batch_size"],
            "max_samples": options["max_samples"],
            "context_size": options["context_size"],
        }
        values.update({k: v for k, v in explicit.items() if v is not None})
        if "layers" not in values or "hook_types" not in values:
            raise CommandError("Give --layers and --hooks (or a --template).")
        try:
            return ExtractionIn.model_validate({"dataset_id": "pending", **values})
        except ValidationError as exc:
            raise CommandError(validation_message(exc)) from None

    def handle(self, *args, **options):
        request = self._request(options)
        model = model_resolve(options["model"], options["quantization"])
        if ExtractionJob.objects.filter(status=ExtractionStatus.RUNNING).exists():
            raise CommandError("Another extraction is running on this device; wait for it.")
        try:
            dataset_id = dataset_resolve(options["dataset"], options["text_field"])
            data = request.model_dump() | {"dataset_id": dataset_id}
            out = Path(options["out"]) if options["out"] else None
            job = extraction.extraction_start(model_id=model.pk, out=out, enqueue=False, **data)
        except ServiceError as exc:
            raise CommandError(exc.message) from None
        self._run_with_progress(job)

    def _run_with_progress(self, job: ExtractionJob) -> None:
        worker = threading.Thread(target=extraction.extraction_run, args=(job.pk,), daemon=True)
        worker.start()
        with tqdm(
            total=job.max_samples * job.context_size,
            unit="tok",
            unit_scale=True,
            desc=f"extract {job.pk}",
        ) as bar:
            while worker.is_alive():
                worker.join(POLL_SECONDS)
                self._advance(bar, job.pk)
            self._advance(bar, job.pk)
        job.refresh_from_db()
        if job.status != ExtractionStatus.COMPLETED:
            raise CommandError(f"Extraction {job.status}: {job.error_message}")
        self.stdout.write(
            self.style.SUCCESS(
                f"{job.pk}: {job.tokens_total} tokens, {len(job.manifest['hooks'])} sites,"
                f" {job.bytes_written / 1e6:.1f} MB in {job.output_path}"
                f" ({job.tokens_per_second:,.0f} tok/s)"
            )
        )

    @staticmethod
    def _advance(bar: tqdm, job_id: str) -> None:
        done, total = (
            ExtractionJob.objects.filter(pk=job_id).values_list("tokens_done", "tokens_total").get()
        )
        if total and bar.total != total:
            bar.total = total
        bar.update(max(done - bar.n, 0))
