"""Peak resident memory (RSS) of one extraction, measured in a fresh process.

    python -m benchmarks.memory --model-dir DIR --sequences N [--method ours|seed_style] …

The child loads the model, runs one warm-up forward, then measures its peak RSS (see `PeakRSS`)
while the extraction runs over a streamed corpus (texts generated lazily, never held); it prints
one JSON line:
{"peak_rss_mb", "rss_before_mb", "n_sequences", "method"} in MiB. `peak_rss` runs that child from
the benchmark, so every measurement starts from the same clean process.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
from itertools import islice
from pathlib import Path

import psutil
import torch
import transformers

from models_app.ml.extract import ExtractionSpec, run_extraction
from models_app.ml.loading import load_model
from models_app.ml.tokens import batched, pack_documents

from .workload import HOOK_SETS, RESIDUAL, iter_corpus, load_tokenizer, sites_for

SAMPLE_S = 0.005
REPO_ROOT = Path(__file__).resolve().parent.parent


class PeakRSS:
    """Peak resident memory (MiB) of this process between enter and exit.

    Linux: the kernel's high-water mark VmHWM, reset on enter through /proc/self/clear_refs, so
    nothing is missed. Elsewhere: a thread sampling the RSS every SAMPLE_S seconds.
    """

    def __init__(self):
        self.peak = 0
        self._proc = psutil.Process()
        self._kernel = os.access("/proc/self/clear_refs", os.W_OK)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="rss-sampler", daemon=True)

    def _sample(self) -> None:
        while not self._done.wait(SAMPLE_S):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __enter__(self) -> PeakRSS:
        if self._kernel:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
        else:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._kernel:
            self.peak = _vm_hwm_bytes()
        else:
            self._done.set()
            self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)

    @property
    def peak_mb(self) -> float:
        return self.peak / 2**20


def _vm_hwm_bytes() -> int:
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024


def _warm_up(model, batch_size: int, context_size: int) -> None:
    """Two full forwards at the extraction's batch shape before measuring: the mmapped weights
    are paged in, and the allocator holds the forward's own working set, as it does after the
    first batches of any extraction."""
    ids = torch.zeros((batch_size, context_size), dtype=torch.long, device=model.device)
    with torch.no_grad():
        for _ in range(2):
            model(input_ids=ids, use_cache=False)


def _ours(model, tokenizer, args, out_dir: Path) -> None:
    spec = ExtractionSpec(
        layers=args.layers,
        hook_types=list(HOOK_SETS[args.hooks]),
        context_size=args.context_size,
        batch_size=args.batch_size,
        max_samples=args.sequences,
        shard_sequences=args.shard_sequences,
    )
    run_extraction(model, tokenizer, iter_corpus(), spec, out_dir, meta={})


def _seed_style(model, tokenizer, args, out_dir: Path) -> None:
    from . import peers

    sites = sites_for(model, args.layers, RESIDUAL)
    seqs = pack_documents(tokenizer, iter_corpus(), args.context_size, args.sequences)
    dtype = torch.float32 if model.device.type == "cpu" else torch.bfloat16
    runner = peers.seed_style_runner(model, sites, dtype)
    runner(list(batched(islice(seqs, args.sequences), args.batch_size)), out_dir)


def measure(args) -> dict:
    """Load the model, then run one extraction under the RSS sampler (runs in the child)."""
    device = torch.device(args.device)
    model, _ = load_model(args.model_dir, args.quantization, device)
    tokenizer = load_tokenizer(args.model_dir)
    _warm_up(model, args.batch_size, args.context_size)
    before = psutil.Process().memory_info().rss / 2**20
    run = _ours if args.method == "ours" else _seed_style
    with tempfile.TemporaryDirectory() as tmp, PeakRSS() as sampler:
        run(model, tokenizer, args, Path(tmp) / "out")
    return {
        "method": args.method,
        "hooks": args.hooks,
        "n_sequences": args.sequences,
        "rss_before_mb": round(before, 1),
        "peak_rss_mb": round(sampler.peak_mb, 1),
    }


def peak_rss(model_dir: Path, n_sequences: int, *, method: str = "ours", **opts) -> dict:
    """Run `measure` in a fresh Python process; returns its JSON result (see the module doc).

    opts: layers (list), context_size, batch_size, shard_sequences, device, quantization,
    hooks (a HOOK_SETS name).
    """
    cmd = [sys.executable, "-m", "benchmarks.memory", "--model-dir", str(model_dir)]
    cmd += ["--sequences", str(n_sequences), "--method", method]
    for key, value in opts.items():
        if value is None:
            continue
        value = ",".join(map(str, value)) if isinstance(value, list | tuple) else value
        cmd += ["--" + key.replace("_", "-"), str(value)]
    path = os.pathsep.join(filter(None, (str(REPO_ROOT), os.environ.get("PYTHONPATH"))))
    env = {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory run failed: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__)
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--sequences", type=int, required=True)
    p.add_argument("--method", choices=("ours", "seed_style"), default="ours")
    p.add_argument("--layers", type=lambda v: [int(x) for x in v.split(",")], default=[3, 6, 9])
    p.add_argument("--context-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--shard-sequences", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quantization", default="FP16")
    p.add_argument("--hooks", choices=sorted(HOOK_SETS), default="residual", help="ours only")
    return p


if __name__ == "__main__":
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    print(json.dumps(measure(_parser().parse_args())))
