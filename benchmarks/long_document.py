"""One very long document through the GPU worker's own job: peak RSS above idle.

    python -m benchmarks.long_document [--mb 300] [--arch llama] [--model-dir DIR]
        [--quantization FP16] [--max-samples 50] [--context-size 64]

A .txt file of ONE line of `--mb` MB (plain English, with `<s>`-like strings in it) is imported
(normalized to texts.jsonl as an upload or a Hub import does; peak RSS above the RSS before), then
extracted by `tasks.extraction_run_task`, the function the GPU worker runs: the dataset read by
`dataset_texts`, the model from the resident cache, the job row updated as it goes. A first
extraction over a short dataset loads the model and warms the tokenizer and allocator; the idle
RSS is taken after it, then the kernel's high-water mark (VmHWM) is reset and the long job runs.
The child prints one JSON line: {"line_mb", "import_rows", "import_peak_above_idle_mb",
"idle_rss_mb", "peak_rss_mb", "peak_above_idle_mb", "status", "error", "n_tokens", "seconds"}
(MiB). Everything lives in a temporary data folder with its own SQLite database; the model runs on
the worker's device.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SENTENCE = (
    "The quick brown fox jumps over the lazy dog while <s>the cat</s> sleeps in the warm sun; "
    "researchers study the residual stream of a transformer to find features. "
)


def _write_long_line(path: Path, mb: int) -> int:
    """A .txt file holding one line of about `mb` MiB; returns its size in bytes."""
    block = (SENTENCE * 4096).encode()  # ~0.6 MB
    with open(path, "wb") as fh:
        for _ in range(max(1, mb * 2**20 // len(block))):
            fh.write(block)
        fh.write(b"\n")
    return path.stat().st_size


def _import(src: Path, dest: Path):
    """Normalize the .txt into the dataset's texts.jsonl as an import does: (rows, peak MiB)."""
    from datasets_app.formats import Source, texts_normalize

    from .memory import PeakRSS

    with PeakRSS() as peak:
        result = texts_normalize([Source(src, "txt")], dest)
    return result.row_count, peak.peak_mb


def _rows(model_dir: Path, quantization: str):
    from transformers import AutoConfig

    from datasets_app.models import Dataset, DatasetSource, DatasetStatus
    from datasets_app.storage import texts_path
    from models_app.ml.configs import num_layers
    from models_app.ml.extract import hidden_size, max_positions
    from models_app.models import Model, ModelStatus

    config = AutoConfig.from_pretrained(model_dir)
    model = Model.objects.create(
        name="long-document", hf_repo_id="bench/long-document", quantization=quantization,
        status=ModelStatus.READY, local_path=str(model_dir), num_layers=num_layers(config),
        hidden_dim=hidden_size(config), max_position=max_positions(config),
    )  # fmt: skip
    datasets = []
    for name in ("warm-up", "one long line"):
        row = Dataset.objects.create(
            name=name, source=DatasetSource.UPLOAD, status=DatasetStatus.READY
        )
        texts_path(row.pk).parent.mkdir(parents=True, exist_ok=True)
        datasets.append(row)
    return model, datasets, texts_path


def _job(model, dataset, args):
    from models_app import extraction

    return extraction.extraction_start(
        model_id=model.pk, dataset_id=dataset.pk, layers=[0], hook_types=["residual"],
        batch_size=min(args.max_samples, 16), max_samples=args.max_samples,
        context_size=args.context_size, enqueue=False,
    )  # fmt: skip


def child(args) -> dict:
    import django

    django.setup()
    import psutil
    from django.core.management import call_command

    from models_app import tasks
    from models_app.models import ExtractionJob

    from .memory import PeakRSS

    call_command("migrate", verbosity=0)
    model_dir = args.model_dir
    if model_dir is None:
        from mistudio.testing.tiny_models import build_tiny_model

        model_dir = build_tiny_model(args.arch, Path(os.environ["MISTUDIO_DATA_DIR"]) / "model")
    model, (small, big), texts_path = _rows(Path(model_dir), args.quantization)
    texts_path(small.pk).write_text(json.dumps(SENTENCE * 200) + "\n" + json.dumps("short") + "\n")
    src = Path(os.environ["MISTUDIO_DATA_DIR"]) / "one-line.txt"
    size = _write_long_line(src, args.mb)
    import_idle = psutil.Process().memory_info().rss
    rows, import_peak = _import(src, texts_path(big.pk))
    src.unlink()
    warm = _job(model, small, args)
    tasks.extraction_run_task(warm.pk)  # loads the model, warms the tokenizer and allocator
    assert ExtractionJob.objects.get(pk=warm.pk).status == "completed"
    idle = psutil.Process().memory_info().rss
    job = _job(model, big, args)
    started = time.monotonic()
    with PeakRSS() as peak:
        tasks.extraction_run_task(job.pk)
    seconds = time.monotonic() - started
    job.refresh_from_db()
    return {
        "line_mb": round(size / 2**20, 1),
        "import_rows": rows,
        "import_peak_above_idle_mb": round(import_peak - import_idle / 2**20, 1),
        "idle_rss_mb": round(idle / 2**20, 1),
        "peak_rss_mb": round(peak.peak_mb, 1),
        "peak_above_idle_mb": round(peak.peak_mb - idle / 2**20, 1),
        "status": job.status,
        "error": job.error_message,
        "n_tokens": job.tokens_total,
        "seconds": round(seconds, 2),
    }


def run(args) -> dict:
    """Run `child` in a fresh process with its own data folder and SQLite database."""
    with tempfile.TemporaryDirectory(prefix="mistudio-longdoc-") as tmp:
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO_ROOT),
            "DJANGO_SETTINGS_MODULE": "mistudio.settings",
            "MISTUDIO_DATA_DIR": tmp,
            "MISTUDIO_SQLITE_PATH": str(Path(tmp) / "db.sqlite3"),
            "DATABASE_URL": "",
            "HF_HUB_OFFLINE": "1",
            "MISTUDIO_DISK_MARGIN_MB": "1",
        }
        cmd = [sys.executable, "-m", "benchmarks.long_document", "--child", *sys.argv[1:]]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT, env=env)
        if done.returncode != 0:
            raise SystemExit(f"child failed ({done.returncode}):\n{done.stderr[-3000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.long_document", description=__doc__)
    p.add_argument("--mb", type=int, default=300, help="length of the one line, MiB")
    p.add_argument("--arch", default="llama", help="tiny model built when no --model-dir")
    p.add_argument("--model-dir", type=Path, default=None)
    p.add_argument("--quantization", default="FP16")
    p.add_argument("--max-samples", type=int, default=50)
    p.add_argument("--context-size", type=int, default=64)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return p


if __name__ == "__main__":
    parsed = _parser().parse_args()
    print(json.dumps(child(parsed) if parsed.child else run(parsed)))
