"""An extraction split into parts that several workers run, resumable shard by shard.

    plan_extraction   (once, any worker)  pack the texts into the token stream (N, T) int32 at
                      .parts/tokens.i32, take the first batch's value-histogram ranges, and write
                      .parts/plan.json: n_sequences, shard_sequences, ranges, the parts
    run_shards        (each part, any worker)  shard k = sequences [k·S, (k+1)·S) of the stream,
                      forwarded in batches of B from the shard's first sequence and written with
                      its final number k; then .parts/shard-<k>.json: its files' records (sha256)
                      and its sites' statistics accumulators. A shard whose record exists and
                      whose files still hash to it is skipped: a resumed part starts at its first
                      unfinished shard
    finish_extraction (last part)  merge the shards' statistics in shard order (merge.py) and
                      write the one manifest; .parts/ is removed

The output equals a one-worker run's whatever the number of parts and the order they finish in:
same token ids, shard boundaries and numbering, one manifest. Activations are bit-identical when
the shard size is a multiple of the batch size (then every batch is the same batch); otherwise a
batch that would straddle two shards is forwarded as two smaller ones (equal within float
tolerance). Nothing here knows about Django.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import ExtractionError
from .extract import ExtractionSpec, _loop, _Plan, _plan, _Run, build_manifest
from .hooks import BRANCH_HOOK_TYPES, capture
from .merge import merged_stats
from .snapshot import SiteSnapshots
from .storage import (
    MANIFEST_NAME,
    NonFiniteError,
    remove_partial,
    sha256_file,
    write_manifest,
)
from .tokens import Document, pack_documents

PARTS_DIR = ".parts"
TOKENS_FILE = "tokens.i32"
PLAN_FILE = "plan.json"


def _parts_dir(out_dir: Path) -> Path:
    return Path(out_dir) / PARTS_DIR


def _write_json(path: Path, obj: dict) -> None:
    """Atomically (temp name, fsync, rename): a reader sees all of it or nothing."""
    tmp = path.with_name(".tmp-" + path.name)
    with open(tmp, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def split_shards(n_shards: int, n_parts: int) -> list[tuple[int, int]]:
    """[(first shard, end shard)] of at most n_parts parts, whole shards, sizes within 1."""
    n_parts = max(1, min(n_parts, n_shards))
    base, extra = divmod(n_shards, n_parts)
    bounds, start = [], 0
    for i in range(n_parts):
        end = start + base + (1 if i < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


def _pack_to_file(tokenizer, texts: Iterable[Document], spec: ExtractionSpec, path: Path) -> int:
    """Stream the packed sequences (T,) to `path` as int32; returns how many."""
    seqs = pack_documents(
        tokenizer, texts, spec.context_size, spec.max_samples, special_tokens=spec.special_tokens
    )
    n = 0
    with open(path, "wb") as f:
        try:
            for seq in seqs:
                f.write(seq.to(torch.int32).numpy().tobytes())
                n += 1
        except ValueError as exc:  # the tokenizer cannot pack (no EOS, context too short)
            raise ExtractionError(str(exc)) from exc
        f.flush()
        os.fsync(f.fileno())
    return n


def token_rows(out_dir: Path, context_size: int, start: int, stop: int) -> torch.Tensor:
    """Sequences [start, stop) of the packed stream, (n, T) int64 (read from disk, no repacking)."""
    mm = np.memmap(_parts_dir(out_dir) / TOKENS_FILE, dtype=np.int32, mode="r")
    rows = np.array(mm[start * context_size : stop * context_size]).reshape(-1, context_size)
    return torch.from_numpy(rows).long()


def _first_batch_ranges(model: nn.Module, plan: _Plan, ids: torch.Tensor) -> dict:
    """The value-histogram range of every site as a one-worker run sets it: from the first batch
    (one forward of ids (b, T); halved on GPU out of memory like the run)."""
    while True:
        snaps = SiteSnapshots([s.name for s in plan.sites], plan.shapes, ids.shape[0],
                              plan.context_size, plan.device)  # fmt: skip
        try:
            with capture(model, plan.sites, snaps.take_site) as cap:
                cap.forward(ids.to(plan.device))
            snaps.update_stats(ids.shape[0])
            return {name: list(r) for name, r in snaps.value_ranges().items()}
        except torch.OutOfMemoryError:
            if ids.shape[0] <= 1:
                raise ExtractionError("out of GPU memory even at batch size 1") from None
            ids = ids[: ids.shape[0] // 2]


def plan_extraction(
    model: nn.Module, tokenizer, texts: Iterable[Document], spec: ExtractionSpec, out_dir: Path,
    n_parts: int,
) -> dict:  # fmt: skip
    """Pack the token stream and write .parts/plan.json; returns the plan:
    {n_sequences, context_size, shard_sequences, n_shards, ranges: {site: [lo, hi]},
    parts: [[first shard, end shard], …]}. ExtractionError for a bad spec or a dataset shorter
    than one sequence. Anything an earlier attempt left in out_dir is removed first."""
    spec.validate(model)
    model.eval()
    plan = _plan(model, spec)
    out_dir = Path(out_dir)
    if (out_dir / MANIFEST_NAME).exists():
        raise ExtractionError(f"{out_dir} already holds a finished extraction")
    remove_partial(out_dir)
    shutil.rmtree(_parts_dir(out_dir), ignore_errors=True)
    _parts_dir(out_dir).mkdir(parents=True)
    n = _pack_to_file(tokenizer, texts, spec, _parts_dir(out_dir) / TOKENS_FILE)
    if n == 0:
        raise ExtractionError(f"the dataset has fewer than {spec.context_size} tokens")
    first = token_rows(out_dir, spec.context_size, 0, min(plan.batch_size, n))
    with torch.no_grad():
        ranges = _first_batch_ranges(model, plan, first)
    n_shards = math.ceil(n / plan.shard_sequences)
    result = {"n_sequences": n, "context_size": spec.context_size,
              "shard_sequences": plan.shard_sequences, "n_shards": n_shards, "ranges": ranges,
              "parts": [list(p) for p in split_shards(n_shards, n_parts)]}  # fmt: skip
    _write_json(_parts_dir(out_dir) / PLAN_FILE, result)
    return result


def read_plan(out_dir: Path) -> dict:
    return json.loads((_parts_dir(out_dir) / PLAN_FILE).read_text())


def _state_path(out_dir: Path, k: int) -> Path:
    return _parts_dir(out_dir) / f"shard-{k:06d}.json"


def shard_finished(out_dir: Path, k: int) -> dict | None:
    """Shard k's record when it finished and every file still hashes to it, else None."""
    path = _state_path(out_dir, k)
    if not path.is_file():
        return None
    state = json.loads(path.read_text())
    for record in state["records"].values():
        file = Path(out_dir) / record["file"]
        if not file.is_file() or sha256_file(file) != record["sha256"]:
            return None
    return state


def _shard_plan(model: nn.Module, spec: ExtractionSpec, layout: dict) -> _Plan:
    plan = _plan(model, spec)
    if plan.shard_sequences != layout["shard_sequences"]:
        raise ExtractionError("this worker's plan differs from the extraction's (shard size)")
    return plan


def run_shards(
    model: nn.Module,
    spec: ExtractionSpec,
    out_dir: Path,
    shards: tuple[int, int],
    *,
    on_progress: Callable[[int, int], None],
    on_shard: Callable[[int, int], None],
    should_cancel: Callable[[], bool],
) -> None:
    """Run shards [first, end) of the plan in out_dir, skipping finished ones.

    on_progress(done, total): tokens of this part (finished shards included);
    on_shard(k, batches): after shard k is durable, with the batches forwarded for it (0 when
    it was finished already). Raises ExtractionCancelled (the unfinished shard's temp files
    removed), ExtractionError with a readable message."""
    model.eval()
    layout = read_plan(out_dir)
    plan = _shard_plan(model, spec, layout)
    S, T, N = layout["shard_sequences"], spec.context_size, layout["n_sequences"]
    first, end = shards
    total = (min(end * S, N) - first * S) * T
    done = 0
    for k in range(first, end):
        rows = (k * S, min((k + 1) * S, N))
        if shard_finished(out_dir, k) is None:
            ids = token_rows(out_dir, T, *rows)  # (n, T)
            base = done
            batches = _run_shard(model, spec, plan, out_dir, k, ids, layout["ranges"],
                                 lambda d, _t, b=base: on_progress(b + d, total),
                                 should_cancel)  # fmt: skip
        else:
            batches = 0
        done += (rows[1] - rows[0]) * T
        on_progress(done, total)
        on_shard(k, batches)


def _run_shard(model, spec, plan, out_dir, k, ids, ranges, report, should_cancel) -> int:
    """Forward shard k's sequences ids (n, T) in batches, write the shard and its state; returns
    the number of batches forwarded."""
    plan.notes = []
    branches = BRANCH_HOOK_TYPES & set(spec.canonical_hook_types())
    check = spec.layers if branches and k == 0 else None
    run = _Run(plan, Path(out_dir), model, check_layers=check, first_shard=k,
               ranges={n: tuple(r) for n, r in ranges.items()})  # fmt: skip
    batches = list(ids.split(plan.batch_size))  # (B, T) each; the last may be shorter
    try:
        done = _loop(run, model, iter(batches), ids.numel(), report, should_cancel)
        records = run.finish()
    except NonFiniteError as exc:
        run.abort()
        raise ExtractionError(f"{exc}; nothing was kept") from exc
    except BaseException:
        run.abort()
        raise
    state = {
        "k": k,
        "n_tokens": done,
        "records": {name: recs[0] for name, recs in records.items()},
        "stats": {name: st.bank.state(st.index) for name, st in run.stats.items()},
        "check": run.check_result,
        "batch_size_used": plan.batch_size_used,
        "notes": plan.notes,
    }
    _write_json(_state_path(out_dir, k), state)
    return len(batches)


def finish_extraction(model: nn.Module, tokenizer, spec: ExtractionSpec, out_dir: Path,
                      meta: dict) -> dict:  # fmt: skip
    """Merge every shard's records and statistics into the one manifest (written last), remove
    .parts/; returns the manifest. ExtractionError when a shard is missing or altered."""
    out_dir = Path(out_dir)
    layout = read_plan(out_dir)
    plan = _shard_plan(model, spec, layout)
    states = []
    for k in range(layout["n_shards"]):
        path = _state_path(out_dir, k)
        if not path.is_file():
            raise ExtractionError(f"shard {k} was not finished; the extraction cannot complete")
        states.append(json.loads(path.read_text()))
    records = {s.name: [st["records"][s.name] for st in states] for s in plan.sites}
    stats = {s.name: merged_stats(st["stats"][s.name] for st in states) for s in plan.sites}
    plan.batch_size_used = min(st["batch_size_used"] for st in states)
    plan.notes = list(dict.fromkeys(n for st in states for n in st["notes"]))
    done = sum(st["n_tokens"] for st in states)
    manifest = build_manifest(model, tokenizer, spec, plan, records, stats, states[0]["check"],
                              meta, done)  # fmt: skip
    for tmp in (out_dir / "shards").rglob(".tmp-*"):
        tmp.unlink(missing_ok=True)
    write_manifest(out_dir, manifest)
    shutil.rmtree(_parts_dir(out_dir), ignore_errors=True)
    return manifest


def sequences_in(layout: dict, shards: tuple[int, int]) -> int:
    """Sequences of shards [first, end) of a plan."""
    S, N = layout["shard_sequences"], layout["n_sequences"]
    return min(shards[1] * S, N) - shards[0] * S


__all__ = ["finish_extraction", "plan_extraction", "read_plan", "run_shards", "sequences_in",
           "shard_finished", "split_shards", "token_rows"]  # fmt: skip
