"""Start the whole app: daphne (web + websockets) and the two django-q2 clusters.

    python manage.py serve [--host 127.0.0.1] [--port 8000] [--devices cuda:0,cuda:1]

--devices starts one GPU worker per device (manage.py worker --device D); default: one, on the
device MISTUDIO_DEVICE picks.

Children share this process's environment; Ctrl-C (or SIGTERM) stops all of them. If one child dies
the others are stopped too, so a supervisor (systemd) can restart the set.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from models_app.checks import migrations_pending, serving_is_safe
from models_app.management.commands.worker import DEVICE, worker_env


def _children(host: str, port: int, devices: list[str]) -> list[tuple[str, list[str], dict]]:
    py = sys.executable
    manage = [py, os.path.join(settings.BASE_DIR, "manage.py")]
    base_env = dict(os.environ, MISTUDIO_HOST=host, PYTHONUNBUFFERED="1")
    gpus = [(f"gpu {d}", [*manage, "qcluster"], worker_env(d, base_env)) for d in devices]
    return [
        (
            "web",
            [
                py,
                "-m",
                "mistudio.webserver",
                "-b",
                host,
                "-p",
                str(port),
                "mistudio.asgi:application",
            ],
            base_env,
        ),
        ("downloads", [*manage, "qcluster"], base_env),
        *gpus,
    ]


class Command(BaseCommand):
    help = "Run daphne and the django-q2 clusters (downloads, gpu) together."

    def add_arguments(self, parser):
        parser.add_argument("--host", default=settings.BIND_HOST)
        parser.add_argument("--port", type=int, default=settings.BIND_PORT)
        parser.add_argument(
            "--devices",
            default=settings.MISTUDIO_DEVICE,
            help="comma-separated devices, one GPU worker each (cuda:0,cuda:1; cpu:0,cpu:1)",
        )

    def handle(self, *args, host: str, port: int, devices: str, **options):
        devices = [d.strip().lower() for d in devices.split(",") if d.strip()]
        bad = [d for d in devices if not DEVICE.fullmatch(d)]
        if bad or not devices or len(set(devices)) != len(devices):
            raise CommandError(
                f"--devices {','.join(devices)!r}: list distinct devices such as cuda:0,cuda:1"
            )
        if not serving_is_safe(host, settings.LOGIN_REQUIRED):
            raise CommandError(
                f"Refusing to serve on {host} without login: set MISTUDIO_LOGIN_REQUIRED=1 and"
                " create a user (manage.py createsuperuser), or bind 127.0.0.1."
            )
        pending = migrations_pending()
        if pending:
            raise CommandError(
                f"The database ({settings.DATABASES['default']['NAME']}) lacks {len(pending)}"
                f" migration(s) ({', '.join(pending[:3])}{', …' if len(pending) > 3 else ''}):"
                " run python manage.py migrate (scripts/run does it for you)."
            )
        procs = {
            name: subprocess.Popen(cmd, env=env)
            for name, cmd, env in _children(host, port, devices)
        }
        self.stdout.write(f"miStudio on http://{host}:{port}  (Ctrl-C stops)")
        stop = {"flag": False}

        def on_signal(signum, frame):
            stop["flag"] = True

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        try:
            while not stop["flag"]:
                dead = [n for n, p in procs.items() if p.poll() is not None]
                if dead:
                    self.stderr.write(f"{', '.join(dead)} exited; stopping the others.")
                    break
                time.sleep(0.5)
        finally:
            self._stop_all(procs)

    def _stop_all(self, procs: dict[str, subprocess.Popen]) -> None:
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for p in procs.values():
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
