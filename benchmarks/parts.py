"""Speed-up of one extraction split into parts over W worker processes, and the work a kill costs.

    python -m benchmarks.parts [--workers 1,2] [--sequences 256] [--shape 4,256]

Builds a GPT-2-shaped model (random weights, offline), plans one extraction into parts
(ml/parts.py: packed token stream, shards of 8 sequences) and runs its parts on W processes at
once, each a fresh Python process with one thread (what one GPU worker per device is on a CPU
machine), each taking the next part from a shared counter. Times the parts phase (planning and the
merge are done once, whatever W). Then kills one process mid-part (SIGKILL after its first
finished shard) and runs the part again: the batches forwarded again are printed. The last line
printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import signal
import tempfile
import time
from pathlib import Path

import torch

from models_app.ml.extract import ExtractionSpec
from models_app.ml.loading import load_model
from models_app.ml.parts import finish_extraction, plan_extraction, read_plan, run_shards

from .workload import build_model_dir, corpus, gpt2_config, load_tokenizer

SHARD = 8
BATCH = 4


def _spec(n: int, T: int) -> ExtractionSpec:
    return ExtractionSpec(layers=[0, 1], hook_types=["residual"], context_size=T,
                          batch_size=BATCH, max_samples=n, shard_sequences=SHARD)  # fmt: skip


def _worker(model_dir: str, out: str, spec: ExtractionSpec, counter, lock, kill_at: int,
            barrier, times) -> None:  # fmt: skip
    torch.set_num_threads(1)
    model, _ = load_model(model_dir, "FP16", torch.device("cpu"))
    parts = read_plan(Path(out))["parts"]
    barrier.wait()  # every worker has loaded the model: time the parts only
    started = time.time()

    def on_progress(done: int, _total: int) -> None:
        if kill_at and done >= kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # a worker killed mid-shard

    while True:
        with lock:
            i = counter.value
            counter.value += 1
        if i >= len(parts):
            times.put((started, time.time()))
            return
        run_shards(model, spec, Path(out), tuple(parts[i]), on_progress=on_progress,
                   on_shard=lambda k, b: None, should_cancel=lambda: False)  # fmt: skip


def _run_parts(model_dir: Path, out: Path, spec, workers: int, kill_at: int = 0) -> float:
    ctx = mp.get_context("spawn")
    counter, lock, barrier, times = ctx.Value("i", 0), ctx.Lock(), ctx.Barrier(workers), ctx.Queue()
    args = (str(model_dir), str(out), spec, counter, lock, kill_at, barrier, times)
    procs = [ctx.Process(target=_worker, args=args) for _ in range(workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    spans = [times.get() for _ in range(workers)] if not kill_at else [(0.0, 0.0)]
    return max(end for _, end in spans) - min(start for start, _ in spans)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--sequences", type=int, default=1024)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--shape", default="6,384", help="layers,hidden of the GPT-2 model")
    args = parser.parse_args()
    torch.set_num_threads(1)
    layers, hidden = (int(x) for x in args.shape.split(","))
    root = Path(tempfile.mkdtemp(prefix="bench-parts-"))
    model_dir = build_model_dir(root / "model", gpt2_config((layers, hidden)))
    model, _ = load_model(str(model_dir), "FP16", torch.device("cpu"))
    tok = load_tokenizer(model_dir)
    spec = _spec(args.sequences, args.context)
    results: dict = {"sequences": args.sequences, "context": args.context,
                     "shape": [layers, hidden], "seconds": {}}  # fmt: skip
    for w in (int(x) for x in args.workers.split(",")):
        out = root / f"out-{w}"
        plan_extraction(model, tok, corpus(4000), spec, out, n_parts=8)
        seconds = _run_parts(model_dir, out, spec, w)
        finish_extraction(model, tok, spec, out, {})
        results["seconds"][str(w)] = round(seconds, 2)
        print(f"{w} worker(s): {seconds:.2f} s for the parts")
    base = results["seconds"].get("1")
    if base:
        results["speedup"] = {w: round(base / s, 2) for w, s in results["seconds"].items()}
    out = root / "out-kill"
    plan_extraction(model, tok, corpus(4000), spec, out, n_parts=1)
    kill_seq = 2 * SHARD + BATCH  # one batch into the third shard
    _run_parts(model_dir, out, spec, 1, kill_at=kill_seq * args.context)
    after: list[int] = []
    run_shards(model, spec, out, tuple(read_plan(out)["parts"][0]), on_progress=lambda d, t: None,
               on_shard=lambda k, b: after.append(b), should_cancel=lambda: False)  # fmt: skip
    clean = -(-args.sequences // BATCH)
    results["kill"] = {"shards_kept": sum(1 for b in after if b == 0),
                       "batches_before_the_kill": kill_seq // BATCH,
                       "batches_after_resume": sum(after), "batches_of_a_clean_run": clean,
                       "batches_recomputed": kill_seq // BATCH + sum(after) - clean}  # fmt: skip
    print(json.dumps(results))


if __name__ == "__main__":
    main()
