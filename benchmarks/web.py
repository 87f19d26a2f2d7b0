"""Web benchmark: page server time and query counts with 500 rows, and the progress delay.

    python -m benchmarks.web [--requests 20] [--samples 20]

- Pages: the models page (`/models/`), the templates list (`/api/templates/extraction?limit=500`)
  and the templates section of the extraction modal (`/templates/section`), with 500 models (a
  third with extraction jobs) and 500 templates. Server time is the median (and p90) over
  `requests` requests through the Django test client, in milliseconds; the query count comes from
  `CaptureQueriesContext`, at 10 and at 500 rows (equal counts: no per-row queries).
- Progress delay: a worker process writes progress with `Model.touch`, exactly as a job does; a
  `channels.testing.WebsocketCommunicator` on `/ws/models/` timestamps the frame carrying that
  write. Milliseconds from just before the write to the frame, median / p95 / max over `samples`
  writes, for the embedded setup (in-memory layer + the relay polling the DB) and for
  channels_redis (the worker publishes directly) when Redis answers at REDIS_URL.

Each configuration runs in a child process with its own settings and a throwaway database
(SQLite always; PostgreSQL too when DATABASE_URL is set), created and dropped here. The last line
printed is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
ROWS, SMALL_ROWS = 500, 10
DEFAULT_REDIS = "redis://127.0.0.1:6379/14"
ORIGIN = [(b"origin", b"http://127.0.0.1:8000"), (b"host", b"127.0.0.1:8000")]
_RNG = random.Random(0)
PAGES = {
    "models_page": "/models/",
    "templates_list": "/api/templates/extraction?limit=500",
    "templates_section": "/templates/section",
}


# ---------------------------------------------------------------------------------------------
# Rows


def seed_rows(start: int, stop: int) -> None:
    """Models and templates number start … stop-1; every third model has an extraction job."""
    from models_app.models import ExtractionJob, Model, ModelStatus
    from templates_app.models import ExtractionTemplate

    statuses = [ModelStatus.READY, ModelStatus.READY, ModelStatus.DOWNLOADING, ModelStatus.ERROR]
    models = Model.objects.bulk_create(
        Model(
            name=f"model-{i}", hf_repo_id=f"bench/model-{i}", quantization="Q4",
            status=statuses[i % len(statuses)], progress=float(i % 100), size_bytes=2**30,
            num_layers=12, hidden_dim=768, params=124_000_000,
        )
        for i in range(start, stop)
    )  # fmt: skip
    ExtractionJob.objects.bulk_create(
        ExtractionJob(
            model=m, dataset_name="d1", layers=[3, 6, 9], hook_types=["residual"], batch_size=8,
            max_samples=1000, context_size=128, status="running" if k % 2 else "completed",
        )
        for k, m in enumerate(models[::3])
    )  # fmt: skip
    ExtractionTemplate.objects.bulk_create(
        ExtractionTemplate(name=f"template-{i}", layers=[0, 6, 11], hook_types=["residual"])
        for i in range(start, stop)
    )


def _new_model_row():
    from models_app.models import Model, ModelStatus

    return Model.objects.create(
        name="progress", hf_repo_id="bench/progress", quantization="Q8",
        status=ModelStatus.DOWNLOADING, bytes_total=2**30,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Pages


def _queries(client, url: str) -> int:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    with CaptureQueriesContext(connection) as ctx:
        response = client.get(url)
    if response.status_code != 200:
        raise RuntimeError(f"GET {url} answered {response.status_code}")
    return len(ctx.captured_queries)


def _time_ms(client, url: str, n: int) -> list[float]:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        client.get(url)
        times.append((time.perf_counter() - start) * 1000)
    return times


def measure_pages(n_requests: int) -> dict:
    """{page: {median_ms, p90_ms, queries_10, queries_500, bytes}} (runs in the child)."""
    from django.test import Client

    client = Client()
    seed_rows(0, SMALL_ROWS)
    small = {name: _queries(client, url) for name, url in PAGES.items()}
    seed_rows(SMALL_ROWS, ROWS)
    out = {}
    for name, url in PAGES.items():
        queries = _queries(client, url)  # also the warm-up request
        times = _time_ms(client, url, n_requests)
        out[name] = {
            "median_ms": round(statistics.median(times), 1),
            "p90_ms": round(_quantile(times, 0.9), 1),
            f"queries_{SMALL_ROWS}": small[name],
            f"queries_{ROWS}": queries,
            "bytes": len(client.get(url).content),
        }
    return out


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# ---------------------------------------------------------------------------------------------
# Progress delay


async def _collect(comm, frames: list[tuple[float, str]]) -> None:
    """Timestamp every frame the websocket receives, as it arrives."""
    while True:
        html = await comm.receive_from(timeout=3600)
        frames.append((time.time(), html))


async def _frame_time(frames: list[tuple[float, str]], marker: str, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for t, html in frames:
            if marker in html:
                return t
        await asyncio.sleep(0.002)
    raise TimeoutError(f"no frame with {marker!r} within {timeout}s")


async def measure_delay(n_samples: int, worker_env: dict) -> dict:
    """Delay (ms) from a worker's progress write to the frame on /ws/models/ (in the child)."""
    from channels.db import database_sync_to_async
    from channels.testing import WebsocketCommunicator

    from mistudio.asgi import application

    row = await database_sync_to_async(_new_model_row)()
    comm = WebsocketCommunicator(application, "/ws/models/", headers=ORIGIN)
    connected, _ = await comm.connect()
    if not connected:
        raise RuntimeError("the websocket refused the connection")
    worker = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "benchmarks.web", "--worker", row.pk,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=worker_env,
        cwd=REPO_ROOT,
    )  # fmt: skip
    frames: list[tuple[float, str]] = []
    collector = asyncio.create_task(_collect(comm, frames))
    try:
        await worker.stdout.readline()  # "ready": Django is set up in the worker
        delays = [await _one_delay(worker, frames, i) for i in range(n_samples + 1)][1:]
    finally:
        collector.cancel()
        worker.stdin.close()
        await worker.wait()
        await comm.disconnect()
    return _delay_summary(delays)


async def _one_delay(worker, frames: list, i: int) -> float:
    worker.stdin.write(f"{i}\n".encode())
    await worker.stdin.drain()
    t_write = float(await worker.stdout.readline())
    t_frame = await _frame_time(frames, f"bench-{i}</span>", timeout=30)
    frames.clear()
    # Writes happen at arbitrary points of the relay's polling cycle, not locked to it.
    await asyncio.sleep(_RNG.uniform(0.0, 0.25))
    return (t_frame - t_write) * 1000


def _delay_summary(delays: list[float]) -> dict:
    return {
        "median_ms": round(statistics.median(delays), 1),
        "p95_ms": round(_quantile(delays, 0.95), 1),
        "max_ms": round(max(delays), 1),
        "samples": len(delays),
    }


def worker_loop(pk: str) -> None:
    """The worker: for each line i on stdin, print the time, then write progress like a job."""
    import django

    django.setup()
    from models_app.models import Model

    Model.objects.filter(pk=pk).exists()  # connect before the first timed write
    print("ready", flush=True)
    for line in sys.stdin:
        i = int(line)
        t_write = time.time()
        Model.touch(pk, progress=float(i % 100), phase=f"bench-{i}")
        print(repr(t_write), flush=True)


# ---------------------------------------------------------------------------------------------
# One configuration (child process)


def child(args) -> dict:
    """Set up Django on a throwaway database, measure what `args.measure` asks, drop it."""
    import django

    django.setup()
    from django.conf import settings
    from django.db import connection

    settings.ALLOWED_HOSTS = [*settings.ALLOWED_HOSTS, "testserver"]
    test = settings.DATABASES["default"].setdefault("TEST", {})
    test["NAME"] = args.test_db
    name = connection.creation.create_test_db(verbosity=0, autoclobber=True, serialize=False)
    try:
        out = {"vendor": connection.vendor, "channel_layer": _layer_name(settings)}
        if "pages" in args.measure:
            out["pages"] = measure_pages(args.requests)
        if "delay" in args.measure:
            out["delay"] = asyncio.run(measure_delay(args.samples, _worker_env(name)))
            relay = settings.PROGRESS_RELAY
            out["relay_interval_s"] = settings.PROGRESS_RELAY_INTERVAL if relay else None
    finally:
        connection.close()
        connection.creation.destroy_test_db(name, verbosity=0)
    return out


def _layer_name(settings) -> str:
    return settings.CHANNEL_LAYERS["default"]["BACKEND"].rsplit(".", 1)[-1]


def _worker_env(db_name: str) -> dict:
    """The child's environment pointed at its test database."""
    env = dict(os.environ)
    url = env.get("DATABASE_URL")
    if url:
        env["DATABASE_URL"] = _with_db_name(url, db_name)
    else:
        env["MISTUDIO_SQLITE_PATH"] = db_name
    return env


# ---------------------------------------------------------------------------------------------
# The command (parent process)


def _redis_reachable(url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


def _with_db_name(url: str, name: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + name))


def run_child(measure: str, args, *, database_url: str | None, redis_url: str | None) -> dict:
    """Run one configuration in a fresh process with its own data dir; returns its JSON."""
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    env |= {"PYTHONPATH": str(REPO_ROOT), "DJANGO_SETTINGS_MODULE": "mistudio.settings"}
    with tempfile.TemporaryDirectory(prefix="mistudio-web-bench-") as tmp:
        env["MISTUDIO_DATA_DIR"] = tmp
        test_db = f"{tmp}/bench.sqlite3"
        if database_url:
            env["DATABASE_URL"] = database_url
            test_db = f"mistudio_bench_{os.getpid()}"
        if redis_url:
            env["REDIS_URL"] = redis_url
        cmd = [sys.executable, "-m", "benchmarks.web", "--child", "--measure", measure]
        cmd += ["--test-db", test_db, "--requests", str(args.requests)]
        cmd += ["--samples", str(args.samples)]
        done = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{measure} run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_web_benchmark(args) -> dict:
    """Every configuration that can run here; returns the JSON-ready result."""
    notes: list[str] = []
    sqlite = run_child("pages,delay", args, database_url=None, redis_url=None)
    redis_url = os.environ.get("REDIS_URL") or DEFAULT_REDIS
    redis = None
    if _redis_reachable(redis_url):
        redis = run_child("delay", args, database_url=None, redis_url=redis_url)
    else:
        notes.append(f"Redis not reachable at {redis_url}: no channels_redis delay")
    pg_url = os.environ.get("DATABASE_URL")
    postgres = run_child("pages", args, database_url=pg_url, redis_url=None) if pg_url else None
    if not pg_url:
        notes.append("DATABASE_URL not set: SQLite only")
    return summarize(sqlite, redis, postgres, args, notes)


def summarize(sqlite: dict, redis: dict | None, postgres: dict | None, args, notes) -> dict:
    """Flat headline keys (SQLite pages, both delays) plus the details of every run."""
    result = {}
    for page, r in sqlite["pages"].items():
        result[f"{page}_ms"] = r["median_ms"]
        result[f"{page}_queries"] = r[f"queries_{ROWS}"]
        result[f"{page}_queries_constant"] = r[f"queries_{ROWS}"] == r[f"queries_{SMALL_ROWS}"]
    result["progress_delay_ms_relay"] = sqlite["delay"]["median_ms"]
    result["progress_delay_ms_redis"] = redis and redis["delay"]["median_ms"]
    result |= {
        "rows": ROWS,
        "requests": args.requests,
        "sqlite": sqlite["pages"],
        "postgresql": postgres and postgres["pages"],
        "progress": {"embedded_relay": sqlite["delay"], "redis": redis and redis["delay"]},
        "relay_interval_s": sqlite.get("relay_interval_s"),
        "machine": _machine(),
        "notes": notes,
    }
    return result


def _machine() -> dict:
    import platform

    import django

    from models_app.ml.device import cpu_model_name

    return {"cpu": cpu_model_name(), "cores": os.cpu_count(), "python": platform.python_version(),
            "django": django.__version__}  # fmt: skip


def table(result: dict) -> str:
    """Human-readable lines before the JSON."""
    lines = [f"{'page (SQLite, 500 rows)':<28}{'median ms':>10}{'queries':>9}{'constant':>10}"]
    for page in PAGES:
        lines.append(
            f"{page:<28}{result[f'{page}_ms']:>10}{result[f'{page}_queries']:>9}"
            f"{str(result[f'{page}_queries_constant']):>10}"
        )
    for page, r in (result["postgresql"] or {}).items():
        lines.append(f"{page + ' (PostgreSQL)':<28}{r['median_ms']:>10}{r['queries_500']:>9}")
    for name, d in result["progress"].items():
        if d:
            lines.append(f"progress delay, {name}: median {d['median_ms']} ms, p95 {d['p95_ms']}")
    lines += [f"note: {n}" for n in result["notes"]]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.web", description=__doc__)
    p.add_argument("--requests", type=int, default=20, help="timed requests per page")
    p.add_argument("--samples", type=int, default=20, help="progress writes per channel layer")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--measure", default="pages,delay", help=argparse.SUPPRESS)
    p.add_argument("--test-db", help=argparse.SUPPRESS)
    p.add_argument("--worker", metavar="MODEL_ID", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mistudio.settings")
    if args.worker:
        worker_loop(args.worker)
    elif args.child:
        print(json.dumps(child(args)))
    else:
        result = run_web_benchmark(args)
        print(table(result))
        print(json.dumps(result))


if __name__ == "__main__":
    main()
