"""List the models miStudio knows, as the Models page shows them.

python manage.py models [--status ready]
"""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from mistudio.errors import ServiceError
from mistudio.humanize import bytes_h, params_h
from models_app.selectors import model_list

COLUMNS = ("id", "repo", "quant", "status", "params", "memory", "loaded")


class Command(BaseCommand):
    help = "List downloaded models: id, repo, quantization, status, parameters, memory."

    def add_arguments(self, parser):
        parser.add_argument("--status", help="only models in this status (e.g. ready)")

    def handle(self, *args, status: str | None, **options):
        try:
            rows = [_row(m) for m in model_list(status=status)]
        except ServiceError as exc:
            raise CommandError(exc.message) from None
        if not rows:
            self.stdout.write("No models yet: manage.py download owner/model --quantization Q4")
            return
        widths = [max(len(str(r[i])) for r in [COLUMNS, *rows]) for i in range(len(COLUMNS))]
        for line in [COLUMNS, *rows]:
            self.stdout.write("  ".join(str(v).ljust(w) for v, w in zip(line, widths, strict=True)))


def _row(m) -> tuple:
    memory = m.mem_req_bytes if m.mem_req_bytes is not None else m.mem_estimate_bytes
    return (
        m.pk, m.hf_repo_id, m.quantization, m.status, params_h(m.params), bytes_h(memory),
        "yes" if m.is_loaded else "",
    )  # fmt: skip
