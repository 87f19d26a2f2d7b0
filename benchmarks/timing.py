"""Timing the benchmark's methods: fresh output folder per run, wall and CPU seconds, rounds
whose method order rotates, paired ratios within a round."""

from __future__ import annotations

import gc
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .workload import Workload

# Runs one workload end to end, writing under the given folder; returns the tokens processed.
Method = Callable[[Workload, Path], int]

WARM_UP_SEQUENCES = 2


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(method: Method, work: Workload, scratch: Path, device) -> dict:
    """Run once into a fresh folder: {"s": wall seconds, "cpu_s": CPU seconds of this process
    (all its threads), "tokens", "gpu_mb": peak GPU MiB or 0}."""
    out_dir = scratch / "out"
    shutil.rmtree(out_dir, ignore_errors=True)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    start, cpu = time.perf_counter(), time.process_time()
    tokens = method(work, out_dir)
    _sync(device)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    gpu = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0
    shutil.rmtree(out_dir, ignore_errors=True)
    return {"s": seconds, "cpu_s": cpu, "tokens": tokens, "gpu_mb": gpu}


def warm_up(methods: dict[str, Method], work: Workload, scratch, device, notes) -> dict:
    """Run each method once on the first WARM_UP_SEQUENCES sequences, untimed, so one-off costs
    (allocator, lazy inits) do not count; a method that fails is dropped with a note."""
    head = work.head(WARM_UP_SEQUENCES)
    kept = {}
    for name, method in methods.items():
        try:
            time_once(method, head, scratch, device)
            kept[name] = method
        except Exception as exc:  # a peer that cannot run this model is reported, not fatal
            notes.append(f"{name} failed: {type(exc).__name__}: {exc}"[:400])
    return kept


def time_methods(methods: dict[str, Method], work: Workload, repeats: int, scratch, device,
                 sequences: dict[str, int] | None = None):  # fmt: skip
    """Tokens/s of each method over `repeats` rounds, rotating the order every round. A method
    named in `sequences` runs on that many of the workload's first sequences, the others on all.

    Ratios are taken within a round (see paired_ratios): load from other processes that lasts
    longer than a round then hits both sides alike, so many short rounds beat a few long ones.

    Returns {name: {"tok_s": median, "runs_tok_s": [one per round], "runs_cpu_tok_s": [tokens
    per CPU second of this process, one per round], "gpu_peak_mb": max, "sequences": N}}. Wall
    time is what the targets are about; CPU time shows the work a method does whatever else
    loads the machine.
    """
    names, sizes = list(methods), sequences or {}
    works = {n: work.head(sizes[n]) if n in sizes else work for n in names}
    out = {n: {"runs_tok_s": [], "runs_cpu_tok_s": [], "gpu_peak_mb": 0.0,
               "sequences": len(works[n].tokens)} for n in names}  # fmt: skip
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            run, row = time_once(methods[name], works[name], scratch, device), out[name]
            row["runs_tok_s"].append(run["tokens"] / run["s"])
            row["runs_cpu_tok_s"].append(run["tokens"] / run["cpu_s"])
            row["gpu_peak_mb"] = max(row["gpu_peak_mb"], run["gpu_mb"])
    for row in out.values():
        row["tok_s"] = statistics.median(row["runs_tok_s"])
    return out
