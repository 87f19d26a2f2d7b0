"""A live miStudio for browser and crash tests: daphne + both django-q2 clusters as subprocesses,
sharing the test database (SQLite file or PostgreSQL test DB) with the test process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import suppress
from pathlib import Path

from django.conf import settings
from django.db import connection

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _db_env() -> dict[str, str]:
    db = connection.settings_dict
    if db["ENGINE"].endswith("sqlite3"):
        return {"MISTUDIO_SQLITE_PATH": str(db["NAME"]), "DATABASE_URL": ""}
    user = db.get("USER") or ""
    host = db.get("HOST") or "127.0.0.1"
    port = db.get("PORT") or 5432
    return {"DATABASE_URL": f"postgres://{user}@{host}:{port}/{db['NAME']}"}


class LiveStack:
    """Start with `with LiveStack(hub_endpoint) as live:`; `live.url` is the base URL."""

    def __init__(
        self, hf_endpoint: str, *, extra_env: dict[str, str] | None = None, clusters: bool = True
    ):
        self.clusters = clusters  # False: the web server alone (request-handling tests)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            **_db_env(),
            "HF_ENDPOINT": hf_endpoint,
            "HF_HUB_CACHE": str(settings.MODELS_CACHE_DIR),
            "MISTUDIO_DATA_DIR": str(settings.DATA_DIR),
            "MISTUDIO_DISK_MARGIN_MB": "1",
            "MISTUDIO_DEVICE": "cpu",
            # same key as the test process: it signs django-q2 task payloads and seals tokens
            "DJANGO_SECRET_KEY": settings.SECRET_KEY,
            "PYTHONUNBUFFERED": "1",
            **(extra_env or {}),
        }
        self.procs: dict[str, subprocess.Popen] = {}
        self.log_dir = Path(settings.DATA_DIR) / "live-logs"

    def _spawn(self, name: str, args: list[str], **env) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        # append: a cluster restarted by a crash test keeps its first life's log for the report
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        self.procs[name] = subprocess.Popen(
            args,
            cwd=ROOT,
            env={**self.env, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def start_cluster(self, name: str) -> None:
        env = {"Q_CLUSTER_NAME": settings.GPU_CLUSTER} if name == "gpu" else {}
        self._spawn(name, [sys.executable, "manage.py", "qcluster"], **env)

    def start_worker(self, device: str) -> str:
        """Start a GPU worker bound to `device` (manage.py worker --device); returns its name."""
        name = f"gpu-{device.replace(':', '')}"
        self._spawn(name, [sys.executable, "manage.py", "worker", "--device", device])
        return name

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs.pop(name)
        os.killpg(proc.pid, sig)
        proc.wait(timeout=30)

    def __enter__(self) -> LiveStack:
        self._spawn(
            "web",
            [
                sys.executable,
                "-m",
                "mistudio.webserver",  # daphne with request bodies bounded
                "-b",
                "127.0.0.1",
                "-p",
                str(self.port),
                "mistudio.asgi:application",
            ],
        )
        if self.clusters:
            self.start_cluster("downloads")
            self.start_cluster("gpu")
        self._wait_http()
        return self

    def _wait_http(self, timeout: float = 300) -> None:
        """Wait for daphne to answer (generous: starting Python, Django and torch takes long on a
        busy machine); fail at once if a process died."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = [name for name, proc in self.procs.items() if proc.poll() is not None]
            if dead:
                raise RuntimeError(f"{', '.join(dead)} exited at start: {self.logs()}")
            try:
                urllib.request.urlopen(self.url + "/models/", timeout=5).close()
                return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"daphne did not start: {self.logs()}")

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text()[-3000:]}" for p in self.log_dir.glob("*.log")
        )

    def __exit__(self, *exc) -> None:
        """Stop like systemd's KillMode=mixed: SIGTERM to each main process at once (django-q2's
        sentinel then stops its workers in about a second; SIGTERM to the whole group kills them
        under it and it waits forever), a shared grace period, then SIGKILL to what is left."""
        procs, self.procs = list(self.procs.values()), {}
        for proc in procs:
            proc.terminate()  # a no-op for one that already exited
        deadline = time.monotonic() + 15
        for proc in procs:
            with suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # orphans of a main process that had to go
            proc.wait(timeout=30)
