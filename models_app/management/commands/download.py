"""Download a model from the command line, with the same preflight and checks as the app.

    python manage.py download owner/model --quantization Q4 [--revision R]

An access token comes from HF_TOKEN, or is asked for (not echoed) when the repo needs one and
this is a terminal; never from an argument (arguments end up in shell history and `ps`). Runs the
download and the load check in this process with a tqdm bar; exits non-zero with a message when
the Hub, the disk or the load check refuses.
"""

from __future__ import annotations

import getpass
import os
import sys

from django.core.management.base import BaseCommand, CommandError
from pydantic import ValidationError

from mistudio.errors import ServiceError
from mistudio.humanize import bytes_h, params_h
from mistudio.validation import validation_message
from models_app import jobs, resident, services
from models_app.management.progress import run_with_bar
from models_app.models import Model, ModelStatus
from models_app.schemas import DownloadIn

NEEDS_TOKEN = ("gated", "bad_token", "not_found")


class Command(BaseCommand):
    help = "Download a Hugging Face model at a quantization (FP16, Q8, Q4, Q2) and check it loads."

    def add_arguments(self, parser):
        parser.add_argument("repo", help="Hugging Face repo id, e.g. meta-llama/Llama-3.2-1B")
        parser.add_argument("--quantization", default="Q4", choices=["FP16", "Q8", "Q4", "Q2"])
        parser.add_argument("--revision", help="branch, tag or commit (default: main)")

    def handle(self, *args, repo: str, quantization: str, revision: str | None, **options):
        token = os.environ.get("HF_TOKEN") or None
        try:
            row = self._request(repo, quantization, revision, token)
        except ServiceError as exc:
            if exc.code not in NEEDS_TOKEN or token or not sys.stdin.isatty():
                raise CommandError(self._hint(exc, token)) from None
            token = getpass.getpass(f"{exc.message}\nAccess token for {repo} (not shown): ")
            row = self._request(repo, quantization, revision, token or None)
        self._download(row)
        self._load_check(row)

    def _request(self, repo: str, quantization: str, revision: str | None, token: str | None):
        try:
            data = DownloadIn.model_validate(
                {"hf_repo_id": repo, "quantization": quantization, "revision": revision,
                 "access_token": token}
            )  # fmt: skip
        except ValidationError as exc:
            raise CommandError(validation_message(exc)) from None
        return services.model_download(**data.model_dump(), enqueue=False)

    @staticmethod
    def _hint(exc: ServiceError, token: str | None) -> str:
        if exc.code in NEEDS_TOKEN and not token:
            return f"{exc.message} (set HF_TOKEN, or run this in a terminal to be asked for one)"
        return exc.message

    def _download(self, row: Model) -> None:
        run_with_bar(
            lambda: jobs.model_download_run(row.pk, queue_load_check=False),
            lambda: (
                Model.objects.filter(pk=row.pk)
                .values_list("bytes_done", "bytes_total", "phase")
                .get()
            ),
            unit="B",
            unit_scale=True,
            unit_divisor=1000,
            desc=f"download {row.hf_repo_id}",
        )
        self._fail_unless(row, ModelStatus.QUANTIZING)

    def _load_check(self, row: Model) -> None:
        self.stdout.write(f"loading {row.hf_repo_id} at {row.quantization} to check it …")
        resident.model_load_check_run(row.pk, in_worker=False)
        self._fail_unless(row, ModelStatus.READY)
        row.refresh_from_db()
        self.stdout.write(
            self.style.SUCCESS(
                f"{row.pk}: {row.hf_repo_id} [{row.quantization}] ready — {params_h(row.params)}"
                f" parameters, {bytes_h(row.mem_req_bytes)} as loaded ({row.quant_backend},"
                f" {row.dtype}), {bytes_h(row.size_bytes)} of files"
            )
        )
        if row.load_notice:
            self.stdout.write(row.load_notice)

    @staticmethod
    def _fail_unless(row: Model, status: str) -> None:
        row.refresh_from_db()
        if row.status != status:
            raise CommandError(f"{row.hf_repo_id}: {row.status}: {row.error_message}")
