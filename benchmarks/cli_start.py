"""Time to the first batch of `manage.py extract` on a small model already in the cache.

    python -m benchmarks.cli_start [--runs 3]

In a scratch data folder (SQLite, no Redis): migrate, download the fake Hub's tiny Llama with
`manage.py download`, write a small text file; then run `manage.py extract` `runs` times and
take, for each, the wall seconds from starting the process to the first tqdm line of its bar
that shows work done (the first batch's progress, as the user sees it). Prints one JSON line:
{"first_batch_s": median, "runs_s": [...], "total_s": [...], "model": …}.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mistudio.testing.fakehub import FakeHub

from .workload import corpus

REPO_ROOT = Path(__file__).resolve().parent.parent
MODEL = "tiny/llama"
# "1.02k/4.10k" or "512tok": the first number of a tqdm line; > 0 once the first batch is done
_DONE = re.compile(rb"(\d+(?:\.\d+)?)([kMG]?)(?:/|tok)")
EXTRACT = ["--layers", "0,1", "--hooks", "residual", "--max-samples", "64",
           "--batch-size", "8", "--context-size", "64"]  # fmt: skip


def _env(folder: Path, endpoint: str) -> dict[str, str]:
    drop = ("DATABASE_URL", "REDIS_URL", "TQDM_DISABLE")  # the bar is what is timed
    env = {k: v for k, v in os.environ.items() if k not in drop}
    return env | {
        "MISTUDIO_DATA_DIR": str(folder / "data"), "HF_HOME": str(folder / "hf"),
        "HF_ENDPOINT": endpoint, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_DISABLE_TELEMETRY": "1",
    }  # fmt: skip


def _manage(env: dict, *args: str) -> None:
    cmd = [sys.executable, "manage.py", *args]
    done = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"manage.py {args[0]} failed: {done.stderr.strip()[-1500:]}")


def first_batch_seconds(env: dict, text_file: Path) -> tuple[float, float]:
    """(seconds to the first progress line with work done, seconds to the process's end)."""
    cmd = [sys.executable, "manage.py", "extract", "--model", MODEL, "--dataset", str(text_file),
           *EXTRACT]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)  # fmt: skip
    first, line, tail = None, b"", b""
    while chunk := proc.stderr.read1(4096):
        tail = (tail + chunk)[-3000:]
        for piece in re.split(rb"[\r\n]", line + chunk)[:-1]:
            if first is None and _work_done(piece):
                first = time.perf_counter() - start
        line = re.split(rb"[\r\n]", line + chunk)[-1]
    if proc.wait() != 0 or first is None:
        raise RuntimeError(f"manage.py extract failed: {tail.decode(errors='replace')[-1500:]}")
    return first, time.perf_counter() - start


def _work_done(piece: bytes) -> bool:
    """A line of the extraction's own bar ("extract x_…: …") with tokens done (not the dataset
    import's bar, which comes first)."""
    label, _, rest = piece.strip().partition(b":")
    match = _DONE.search(rest) if label.startswith(b"extract ") else None
    return bool(match) and float(match.group(1)) > 0


def measure(folder: Path, runs: int = 3) -> dict:
    """Set up `folder` (see the module doc) and time `runs` extractions; raises RuntimeError
    when a step fails."""
    folder.mkdir(parents=True, exist_ok=True)
    text_file = folder / "corpus.txt"
    text_file.write_text("\n".join(corpus(200)))
    with FakeHub() as hub:
        hub.add_catalogue()
        env = _env(folder, hub.endpoint)
        _manage(env, "migrate", "--no-input")
        _manage(env, "download", MODEL, "--quantization", "FP16")
        times = [first_batch_seconds(env, text_file) for _ in range(runs)]
    return {
        "first_batch_s": round(statistics.median(t for t, _ in times), 2),
        "runs_s": [round(t, 2) for t, _ in times],
        "total_s": [round(t, 2) for _, t in times],
        "model": MODEL, "extract_args": EXTRACT,
    }  # fmt: skip


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="python -m benchmarks.cli_start", description=__doc__)
    p.add_argument("--runs", type=int, default=3)
    with tempfile.TemporaryDirectory(prefix="mistudio-cli-") as tmp:
        print(json.dumps(measure(Path(tmp), p.parse_args().runs)))
