"""Push a completed extraction to a Hugging Face dataset repo, with a generated dataset card.

    python manage.py push_activations x_… your-name/activations [--public] [--token-env VAR]

The token (write access) comes from the environment variable HF_TOKEN, or the one --token-env
names, or is asked for (not echoed) when this is a terminal; never from an argument (arguments
end up in shell history and `ps`). Runs the push in this process with a tqdm bar of bytes sent;
prints the repo URL, or exits non-zero with the Hub's reason.
"""

from __future__ import annotations

import getpass
import os
import sys

from django.core.management.base import BaseCommand, CommandError
from pydantic import ValidationError

from mistudio.errors import ServiceError
from mistudio.humanize import bytes_h
from mistudio.validation import validation_message
from models_app import share
from models_app.management.progress import run_with_bar
from models_app.models import PushJob, PushStatus
from models_app.schemas import PushIn


class Command(BaseCommand):
    help = "Push a completed extraction (manifest, shards, dataset card) to a Hub dataset repo."

    def add_arguments(self, parser):
        parser.add_argument("extraction", help="extraction id, e.g. x_0123…")
        parser.add_argument("repo", help="dataset repo to push to, e.g. your-name/activations")
        parser.add_argument("--public", action="store_true", help="make a new repo public")
        parser.add_argument(
            "--token-env", default="HF_TOKEN", metavar="VAR",
            help="environment variable holding the token (default: HF_TOKEN)",
        )  # fmt: skip

    def handle(self, *args, extraction: str, repo: str, public: bool, token_env: str, **options):
        token = os.environ.get(token_env) or None
        if token is None and sys.stdin.isatty():
            token = getpass.getpass(f"Access token with write access for {repo} (not shown): ")
        try:
            data = PushIn.model_validate({"repo_id": repo, "token": token, "private": not public})
            push = share.extraction_push(extraction, **data.model_dump(), enqueue=False)
        except ValidationError as exc:
            raise CommandError(validation_message(exc)) from None
        except ServiceError as exc:
            hint = f" (set {token_env})" if exc.code == "token_required" else ""
            raise CommandError(exc.message + hint) from None
        finally:
            token = None
        run_with_bar(
            lambda: share.push_run(push.pk),
            lambda: (
                PushJob.objects.filter(pk=push.pk)
                .values_list("bytes_done", "bytes_total", "phase")
                .get()
            ),
            unit="B",
            unit_scale=True,
            unit_divisor=1000,
            desc=f"push {data.repo_id}",
        )
        push.refresh_from_db()
        if push.status != PushStatus.COMPLETED:
            raise CommandError(f"{push.repo_id}: {push.status}: {push.error_message}")
        self.stdout.write(
            self.style.SUCCESS(
                f"{push.pk}: pushed {push.files_total} files ({bytes_h(push.bytes_total)} and the"
                f" card) to {push.repo_url} at commit {push.commit_sha}"
            )
        )
