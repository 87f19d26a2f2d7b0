"""One GPU worker bound to one device: the django-q2 GPU cluster with one worker process.

    python manage.py worker --device cuda:1     (or cpu:N on a CPU-only machine, for tests)

Run one per device, on this machine or on others that share the PostgreSQL database, the Redis
broker and the data directory (README, "Several GPUs and machines"). The worker loads a model once
and takes part after part of an extraction; at most one GPU job runs on its device at a time.
"""

from __future__ import annotations

import os
import re
import sys

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

DEVICE = re.compile(r"(cpu|cuda):\d+|cpu|cuda|auto")


def worker_env(device: str, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a GPU worker bound to `device`."""
    return dict(base if base is not None else os.environ, MISTUDIO_DEVICE=device,
                Q_CLUSTER_NAME=settings.GPU_CLUSTER)  # fmt: skip


class Command(BaseCommand):
    help = "Run one GPU worker (django-q2 GPU cluster, one process) bound to --device."

    def add_arguments(self, parser):
        parser.add_argument(
            "--device",
            default=settings.MISTUDIO_DEVICE,
            help="cuda:N, cpu:N, cuda, cpu or auto (default MISTUDIO_DEVICE)",
        )

    def handle(self, *args, device: str, **options):
        device = device.strip().lower()
        if not DEVICE.fullmatch(device):
            raise CommandError(f"--device {device!r}: use cuda:N, cpu:N, cuda, cpu or auto")
        manage = os.path.join(settings.BASE_DIR, "manage.py")
        # a fresh process: settings (the device, the cluster) are read at start-up
        os.execve(sys.executable, [sys.executable, manage, "qcluster"], worker_env(device))
