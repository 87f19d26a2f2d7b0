"""Extract activations from the command line, with the same services and validation as the app.

    python manage.py extract --model <id or repo> --dataset <id, name or file> --layers 0,5,11 \
        --hooks residual,mlp --max-samples N --batch-size B --context-size T \
        [--special-tokens text|parse] [--module model.layers.3.mlp.down_proj[:input]]… \
        [--format safetensors|safetensors+saelens] \
        [--template NAME] [--out DIR] [--quantization Q4] [--text-field text]

Hooks: residual (resid_post), mlp, attention, resid_pre, z (attn.hook_z), ln_final.
--format safetensors+saelens also writes OUT/saelens, the datasets folder SAELens trains from.

Runs in this process with a tqdm progress bar; exits non-zero with a message on bad input or a
failed job. A dataset given as a file is registered and normalized here too (the worker's job,
with its own bar), not queued for the cluster.
"""

from __future__ import annotations

from pathlib import Path

from django.core.management.base import BaseCommand, CommandError
from pydantic import ValidationError

from datasets_app.jobs import dataset_normalize_run
from datasets_app.services import dataset_get, dataset_resolve
from mistudio import limits
from mistudio.errors import ServiceError
from mistudio.validation import validation_message
from models_app import extraction, parts
from models_app.management.progress import run_with_bar
from models_app.models import ExtractionJob, ExtractionStatus
from models_app.schemas import ExtractionSettings
from models_app.selectors import model_resolve
from templates_app.selectors import template_named


def _csv(raw: str | None) -> list[str] | None:
    return [part.strip() for part in raw.split(",") if part.strip()] if raw else None


def _module_sites(raw: list[str] | None) -> list[dict] | None:
    """--module PATH (its output) or PATH:input / PATH:output, repeatable."""
    if not raw:
        return None
    sites = []
    for module in raw:
        path, _, io = module.strip().partition(":")
        sites.append({"path": path, "io": io or "output"})
    return sites


def _dataset_progress(dataset_id: str) -> tuple[int, int, str]:
    row = dataset_get(dataset_id)
    return int(row.progress), 100, row.phase


def _normalize_with_bar(dataset_id: str) -> None:
    """Normalize a file the command registered, in this process (it is no web request), with the
    worker's own job and a tqdm bar over the row's progress."""
    run_with_bar(
        lambda: dataset_normalize_run(dataset_id),
        lambda: _dataset_progress(dataset_id),
        unit="%",
        desc=f"dataset {dataset_id}",
    )


class Command(BaseCommand):
    help = "Extract activations (residual, mlp, attention, z, … or any module) over a dataset."
    # The system checks are about serving (bind host, allowed hosts) and load the URL conf and
    # the API (~0.3 s before the first batch); this command serves nothing.
    requires_system_checks: list[str] = []

    def add_arguments(self, parser):
        parser.add_argument("--model", required=True, help="model id (m_…) or repo id")
        parser.add_argument("--quantization", choices=["FP16", "Q8", "Q4", "Q2"])
        parser.add_argument("--dataset", required=True, help="dataset id (d_…), name or file")
        parser.add_argument("--text-field", help="field/column of .jsonl/.csv/.parquet files")
        parser.add_argument("--layers", help="comma-separated block indices, e.g. 0,5,11")
        parser.add_argument(
            "--hooks", help="comma-separated: residual,mlp,attention,resid_pre,z,ln_final"
        )
        parser.add_argument(
            "--module",
            action="append",
            help="also read a module of the model: PATH (its output) or PATH:input; repeatable",
        )
        parser.add_argument("--max-samples", type=int)
        parser.add_argument("--batch-size", type=int)
        parser.add_argument("--context-size", type=int)
        parser.add_argument(
            "--special-tokens",
            choices=["text", "parse"],
            help="special-token strings in the data (<s>, <|im_start|> …): plain text (default)"
            " or parsed as special tokens (chat-formatted data)",
        )
        parser.add_argument(
            "--format",
            dest="output_format",
            choices=limits.OUTPUT_FORMATS,
            help="safetensors shards (default), or also a SAELens-ready datasets folder"
            " (<out>/saelens) written from them at the end",
        )
        parser.add_argument("--template", help="start from a saved extraction template")
        parser.add_argument("--out", help="output folder (new or empty); default: the data dir")

    def _settings(self, options) -> ExtractionSettings:
        values = (
            template_named(options["template"]).extraction_settings() if options["template"] else {}
        )
        explicit = {
            "layers": _csv(options["layers"]),
            "hook_types": _csv(options["hooks"]),
            "module_sites": _module_sites(options["module"]),
            "batch_size": options["batch_size"],
            "max_samples": options["max_samples"],
            "context_size": options["context_size"],
            "special_tokens": options["special_tokens"],
            "output_format": options["output_format"],
        }
        values.update({k: v for k, v in explicit.items() if v is not None})
        if "layers" not in values or "hook_types" not in values:
            raise CommandError("Give --layers and --hooks (or a --template).")
        try:
            return ExtractionSettings.model_validate(values)
        except ValidationError as exc:
            raise CommandError(validation_message(exc)) from None

    def handle(self, *args, **options):
        try:
            settings = self._settings(options)
            model = model_resolve(options["model"], options["quantization"])
            dataset = dataset_resolve(
                options["dataset"], text_field=options["text_field"], normalize=_normalize_with_bar
            )
            job = extraction.extraction_start(
                model_id=model.pk,
                dataset_id=dataset.pk,
                out=Path(options["out"]) if options["out"] else None,
                enqueue=False,
                **settings.model_dump(),
            )
        except ServiceError as exc:
            raise CommandError(exc.message) from None
        self._run_with_progress(job)

    def _run_with_progress(self, job: ExtractionJob) -> None:
        run_with_bar(
            lambda: parts.extraction_run(job.pk, in_worker=False),
            lambda: (
                ExtractionJob.objects.filter(pk=job.pk)
                .values_list("tokens_done", "tokens_total", "phase")
                .get()
            ),
            unit="tok",
            unit_scale=True,
            desc=f"extract {job.pk}",
        )
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
        if job.saelens_export is not None:
            self.stdout.write(f"SAELens folder: {job.saelens_export.path}")
