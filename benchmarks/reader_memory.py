"""Peak memory of reading an extraction back: the reader and the SAELens export, in bounded memory.

    python -m benchmarks.reader_memory [--gb 1.0] [--dir DIR]

Writes a synthetic extraction of about `--gb` GB in our on-disk format (shards through the
extraction's own ShardFile writer, 32 MiB per shard and site, manifest last), then, each in a fresh
child process, measures the peak RSS above the child's RSS before it starts of: reading every
token of two sites shuffled across shards; reading every sequence in order with sha256 checks;
and exporting one site to a SAELens `datasets` folder. Two peaks: the RSS (VmHWM, which also
counts the file-backed pages of memory-mapped shards and Arrow files, page cache the kernel can
reclaim) and the anonymous RSS (heap and tensors, what memory is really bounded by). Prints a
table, then one JSON line: {"extraction_bytes", "runs": {name: {"peak_above_start_mb",
"anon_peak_above_start_mb", "seconds", "items"}}}.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from models_app.ml.storage import DEFAULT_SHARD_BYTES, ShardFile, shard_relpath, write_manifest

from .memory import PeakRSS

SITES = ("blocks.0.hook_resid_post", "blocks.1.hook_resid_post")
D, T = 512, 128


def build(out: Path, gb: float) -> int:
    """A format-true extraction of ~gb GB (two sites, float32, random values); returns bytes."""
    per_seq = T * (D * 4 + 4)
    n_seq = int(gb * 1e9 / (per_seq * len(SITES)))
    cap = max(1, DEFAULT_SHARD_BYTES // per_seq)
    hooks = []
    g = torch.Generator().manual_seed(0)
    for i, name in enumerate(SITES):
        shards, done, k = [], 0, 0
        while done < n_seq:
            n = min(cap, n_seq - done)
            shard = ShardFile(out, shard_relpath(name, k), n, T, D, torch.float32)
            shard.append(torch.randn(n, T, D, generator=g))
            ids_gen = torch.Generator().manual_seed(k)  # shard k holds the same sequences per site
            shards.append(shard.close(torch.randint(0, 32000, (n, T), generator=ids_gen,
                                                    dtype=torch.int32)))  # fmt: skip
            done, k = done + n, k + 1
        hooks.append({"name": name, "layer": i, "hook_type": "resid_post", "d": D, "shape": [D],
                      "dtype": "float32", "shards": shards, "statistics": {}})  # fmt: skip
    manifest = {"schema_version": 1, "context_size": T, "n_sequences": n_seq,
                "n_tokens": n_seq * T, "tokenizer": {"bos_token_id": 1, "eos_token_id": 2},
                "hooks": hooks}  # fmt: skip
    write_manifest(out, manifest)
    return sum(s["bytes"] for h in hooks for s in h["shards"])


def _anon_bytes() -> int:
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"RssAnon:\s+(\d+) kB", status).group(1)) * 1024


class PeakAnon:
    """Peak anonymous resident memory (heap, tensors: what bounds memory; file-backed pages of
    memory-mapped shards are page cache the kernel reclaims), sampled every 5 ms (Linux)."""

    def __enter__(self) -> PeakAnon:
        self.start = self.peak = _anon_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _anon_bytes())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _anon_bytes())


def child(kind: str, path: str) -> dict:
    from models_app.ml.export import export_saelens
    from models_app.ml.reader import open_extraction

    ext = open_extraction(path)
    items, started = 0, time.perf_counter()
    with PeakRSS() as peak, PeakAnon() as anon:
        start_rss = peak._proc.memory_info().rss
        if kind == "tokens_shuffled":
            for batch in ext.tokens(list(SITES), batch_size=4096, shuffle=True):
                items += batch["token_ids"].shape[0]
        elif kind == "sequences_verified":
            for batch in ext.sequences(list(SITES), batch_size=32, verify=True):
                items += batch["token_ids"].shape[0]
        elif kind == "export_saelens":
            with tempfile.TemporaryDirectory() as tmp:
                export_saelens(path, Path(tmp) / "sae", sites=[SITES[0]])
                items = ext.n_sequences
    return {"peak_above_start_mb": round((peak.peak - start_rss) / 2**20, 1),
            "anon_peak_above_start_mb": round((anon.peak - anon.start) / 2**20, 1),
            "seconds": round(time.perf_counter() - started, 1), "items": items}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=1.0)
    parser.add_argument("--dir")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "x"
        size = build(path, args.gb)
        runs = {}
        for kind in ("tokens_shuffled", "sequences_verified", "export_saelens"):
            cmd = [sys.executable, "-m", "benchmarks.reader_memory", "--child", kind, str(path)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            runs[kind] = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{kind:20s} RSS +{runs[kind]['peak_above_start_mb']:7.1f} MiB"
                  f"  anonymous +{runs[kind]['anon_peak_above_start_mb']:7.1f} MiB"
                  f"  {runs[kind]['seconds']:6.1f} s  {runs[kind]['items']} items")  # fmt: skip
    print(json.dumps({"extraction_bytes": size, "runs": runs}))


if __name__ == "__main__":
    main()
