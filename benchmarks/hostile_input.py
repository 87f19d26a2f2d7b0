"""Peak memory of the web server and of a worker under hostile input (issue 13's closing note).

    .venv/bin/python -m benchmarks.hostile_input [--upload-mb 1024] [--line-mb 300]

Starts the real web server (`python -m mistudio.webserver`) on a fresh data dir (SQLite) and
measures, by sampling its RSS every 20 ms:

1. a signed-out 1 GB multipart upload of a .txt dataset, streamed: web-server RSS growth;
2. an anonymous 1 GB upload with login required, and a 3 GB Content-Length: refused from the
   headers (status and time to answer);
3. a 300 MB one-line document: refused by the row cap after reading one capped line;
4. the 576-byte-class Parquet bomb (1,024 rows × 4 MiB, dictionary + zstd) uploaded (the
   request checks its first rows and answers 202 `queued`: web-server RSS), then normalized by
   a worker process (`manage.py shell`) under a 1 GB inflated cap: worker RSS.

Prints one line per measurement. Nothing here is a test: figures depend on the machine.
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
MB = 1024 * 1024


class PeakRss:
    def __init__(self, pid: int):
        self.proc = psutil.Process(pid)
        self.base = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _rss(self) -> int:
        try:
            procs = [self.proc, *self.proc.children(recursive=True)]
            return sum(p.memory_info().rss for p in procs)
        except psutil.Error:
            return 0

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._rss())

    def stop(self) -> tuple[int, int]:
        self._stop.set()
        self._thread.join()
        return self.base, self.peak


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_web(env: dict) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mistudio.webserver", "-b", "127.0.0.1", "-p", str(port),
         "mistudio.asgi:application"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            httpx.get(url + "/accounts/login/", timeout=5)
            return proc, url
        except httpx.HTTPError:
            time.sleep(0.3)
    raise RuntimeError("the web server did not start")


def multipart(name: str, blocks, total: int):
    head = (
        f'--b\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    tail = b"\r\n--b--\r\n"

    def gen():
        yield head
        yield from blocks
        yield tail

    return gen(), len(head) + total + len(tail)


def upload(url: str, name: str, blocks, total: int) -> httpx.Response:
    client = httpx.Client(timeout=3600)
    client.get(url + "/datasets/")
    token = client.cookies.get("csrftoken") or ""
    body, length = multipart(name, blocks, total)
    return client.post(url + "/api/datasets", content=body, headers={
        "Content-Type": "multipart/form-data; boundary=b", "Content-Length": str(length),
        "X-CSRFToken": token,
    })  # fmt: skip


def text_blocks(total: int, *, one_line: bool = False):
    line = b"the quick brown fox jumps over the lazy dog and keeps on running " * 16 + b"\n"
    block = (line.replace(b"\n", b" ") if one_line else line) * (MB // len(line))
    sent = 0
    while sent < total:
        piece = block[: total - sent]
        sent += len(piece)
        yield piece


def parquet_bomb() -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    column = pa.DictionaryArray.from_arrays(
        pa.array([0] * 1024, pa.int32()), pa.array(["a" * 4 * MB])
    )
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": column}), buf, compression="zstd", use_dictionary=True)
    return buf.getvalue()


def measure(label: str, proc: subprocess.Popen, fn) -> None:
    rss = PeakRss(proc.pid)
    start = time.monotonic()
    answer = fn()
    seconds = time.monotonic() - start
    base, peak = rss.stop()
    print(f"{label}: HTTP {answer.status_code} in {seconds:.1f} s; web server RSS"
          f" {base / MB:.0f} → peak {peak / MB:.0f} MB (+{(peak - base) / MB:.0f} MB)"
          f" — {answer.text[:120]!r}", flush=True)  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upload-mb", type=int, default=1024)
    parser.add_argument("--line-mb", type=int, default=300)
    args = parser.parse_args(argv)
    data = Path(tempfile.mkdtemp(prefix="mistudio-hostile-"))
    env = {**os.environ, "MISTUDIO_DATA_DIR": str(data), "DATABASE_URL": "", "REDIS_URL": "",
           "MISTUDIO_DATASET_INFLATED_MAX_MB": "1024", "MISTUDIO_LOGIN_REQUIRED": "0"}  # fmt: skip
    subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], cwd=ROOT, env=env, check=True)
    print(f"machine: {os.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB")
    web, url = start_web(env)
    try:
        total = args.upload_mb * MB
        measure(f"{args.upload_mb} MB upload (.txt, streamed)", web,
                lambda: upload(url, "big.txt", text_blocks(total), total))  # fmt: skip
        line = args.line_mb * MB
        lines = text_blocks(line, one_line=True)
        measure(f"{args.line_mb} MB one-line document", web,
                lambda: upload(url, "line.txt", lines, line))  # fmt: skip
        bomb = parquet_bomb()
        measure(f"{len(bomb)}-byte parquet bomb (1,024 × 4 MiB)", web,
                lambda: upload(url, "bomb.parquet", [bomb], len(bomb)))  # fmt: skip
        worker_bomb(env)
    finally:
        web.terminate()
        web.wait(30)
    login_env = {**env, "MISTUDIO_LOGIN_REQUIRED": "1"}
    web, url = start_web(login_env)
    try:
        total = args.upload_mb * MB
        measure(f"anonymous {args.upload_mb} MB upload, login on", web, lambda: httpx.post(
            url + "/api/datasets", content=text_blocks(total), timeout=600,
            headers={"Content-Length": str(total), "Content-Type": "text/plain"}))  # fmt: skip
    except httpx.HTTPError as exc:
        print(f"anonymous upload: connection closed by the server early ({type(exc).__name__})")
    finally:
        web.terminate()
        web.wait(30)


WORKER = """
import time, psutil
from datasets_app.models import Dataset
from datasets_app import tasks
row = Dataset.objects.filter(file_format="parquet").latest("created_at")
tasks.dataset_normalize_task(row.pk)
row.refresh_from_db()
print("STATUS", row.status, row.error_message[:160])
"""


def worker_bomb(env: dict) -> None:
    proc = subprocess.Popen([sys.executable, "manage.py", "shell", "-c", WORKER], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, text=True)  # fmt: skip
    rss = PeakRss(proc.pid)
    out, _ = proc.communicate(timeout=3600)
    base, peak = rss.stop()
    status = next((line for line in out.splitlines() if line.startswith("STATUS")), out[-200:])
    print(f"parquet bomb normalized by a worker: {status}; worker peak RSS {peak / MB:.0f} MB",
          flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
