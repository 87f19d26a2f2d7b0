"""Export a completed extraction for SAELens (a Hugging Face `datasets` folder).

    python manage.py export_activations <extraction id> --format saelens OUT \
        [--sites a,b] [--dtype float16]

SAELens then trains from it with `use_cached_activations=True, cached_activations_path=OUT`; the
command prints that config filled in for this extraction (exports.saelens_recipe).
Streams shard by shard (bounded memory) with a tqdm bar; exits non-zero with a message on a bad
request, no room on the disk (the same check as the API export, with MISTUDIO_DISK_MARGIN_MB), a
missing or altered shard, or an extraction that is not completed; those it can tell beforehand
are refused before the bar is drawn.
"""

from __future__ import annotations

from pathlib import Path

from django.core.management.base import BaseCommand, CommandError
from tqdm import tqdm

from mistudio.errors import ServiceError
from models_app import exports, extraction, selectors
from models_app.ml.export import EXPORT_DTYPES


class Command(BaseCommand):
    help = "Export a completed extraction as a SAELens-ready datasets folder."

    def add_arguments(self, parser):
        parser.add_argument("extraction_id", help="extraction id (x_…)")
        parser.add_argument("out", type=Path, help="new folder to write")
        parser.add_argument("--format", choices=["saelens"], default="saelens")
        parser.add_argument("--sites", help="comma-separated hook names (default: all)")
        parser.add_argument("--dtype", choices=EXPORT_DTYPES, default="float32")

    def handle(self, *args, extraction_id, out, sites, dtype, **options):
        names = [s.strip() for s in sites.split(",") if s.strip()] if sites else None
        try:  # refused before the bar is drawn: a bad request or no room writes nothing
            extraction.extraction_export_check(extraction_id, out, sites=names, dtype=dtype)
        except ServiceError as exc:
            raise CommandError(exc.message) from None
        with tqdm(unit="seq", desc=f"export {extraction_id}", dynamic_ncols=True) as bar:

            def progress(done: int, total: int) -> None:
                bar.total = total
                bar.update(done - bar.n)

            try:
                folder = extraction.extraction_export(
                    extraction_id, out, sites=names, dtype=dtype, on_progress=progress
                )
            except ServiceError as exc:
                raise CommandError(exc.message) from None
        job = selectors.extraction_get(extraction_id)
        self.stdout.write(f"{folder}\n{exports.saelens_recipe(job, folder, names)}")
