"""On-disk activation format (architecture.md §5) and the bounded, threaded writer that produces it.

    <out>/manifest.json                                  written last, atomically
    <out>/shards/<hook name>/<k:06d>.safetensors
        activations  [n_seq, context_size, d]   float32 on CPU, bfloat16 by default on GPU
        token_ids    [n_seq, context_size]      int32

Shard k holds the same sequences for every hook. Each shard is written to a hidden temp name,
fsynced, then renamed; its sha256 is taken from the bytes on disk. The manifest comes last, after
the shard directories were fsynced; a reader trusts only the shards the manifest lists.

Memory: the main thread copies hooked tensors into a small pool of batch-sized staging slots
(pinned host memory with non_blocking copies on CUDA); a writer thread moves each slot into one
shard buffer per hook and writes shard k of every hook when they are full (the hooks' files side
by side, IO_THREADS at a time). Host memory is therefore
pool slots × batch + one shard per hook, whatever the dataset size. The writer thread runs no
torch kernels (numpy copies, hashing and file I/O only), so it never competes with the forward's
OpenMP threads.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import shutil
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .stats import SiteStats

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
SHARDS_DIR = "shards"
STORAGE_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_TMP_PREFIX = ".tmp-"
# Threads writing the shards of one flush (one file per hook) at once. Hashing and fsync release
# the GIL, so the hooks' files are written side by side: measured on 2 cores, 9 shards of 12 MiB
# took 108 ms instead of 157 ms; on a GPU host the writer keeps up with a faster forward.
IO_THREADS = 4


class StorageError(RuntimeError):
    """A shard or manifest that cannot be written or does not match what was recorded."""


def dtype_name(dtype: torch.dtype) -> str:
    """'float32' for torch.float32, etc."""
    return str(dtype).removeprefix("torch.")


def shard_relpath(hook_name: str, k: int) -> str:
    """Path of shard k of a hook, relative to the extraction directory."""
    return f"{SHARDS_DIR}/{hook_name}/{k:06d}.safetensors"


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file (read through one small reused buffer, not into memory)."""
    with open(path, "rb", buffering=0) as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _commit(tmp: Path, final: Path) -> None:
    # The data is durable before the rename; the directory entries are made durable once, by
    # write_manifest, before the manifest that lists them (a crash before that discards all).
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)


def write_shard(out_dir: Path, relpath: str, activations: torch.Tensor, token_ids: torch.Tensor):
    """Write one shard atomically; returns {file, n_seq, bytes, sha256} for the manifest.

    activations (n_seq, T, d) and token_ids (n_seq, T) must be contiguous CPU tensors.
    """
    final = out_dir / relpath
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(_TMP_PREFIX + final.name)
    save_file({"activations": activations, "token_ids": token_ids}, tmp)
    sha = sha256_file(tmp)
    size = tmp.stat().st_size
    _commit(tmp, final)
    return {"file": relpath, "n_seq": int(activations.shape[0]), "bytes": size, "sha256": sha}


def write_manifest(out_dir: Path, manifest: dict) -> Path:
    """Make the shards' directory entries durable, then write manifest.json atomically (temp
    name, fsync, rename, fsync of the directory); returns its path."""
    shards = out_dir / SHARDS_DIR
    for directory in (*shards.iterdir(), shards) if shards.is_dir() else ():
        _fsync_dir(directory)
    final = out_dir / MANIFEST_NAME
    tmp = out_dir / (_TMP_PREFIX + MANIFEST_NAME)
    tmp.write_text(json.dumps(manifest, indent=2))
    _commit(tmp, final)
    _fsync_dir(out_dir)
    return final


def read_manifest(out_dir: Path) -> dict:
    """The parsed manifest.json of an extraction directory (raises StorageError if missing)."""
    path = Path(out_dir) / MANIFEST_NAME
    if not path.is_file():
        raise StorageError(f"no {MANIFEST_NAME} in {out_dir}: the extraction did not complete")
    return json.loads(path.read_text())


def _verify_shard(out_dir: Path, hook: dict, shard: dict, context_size: int) -> list[str]:
    path = out_dir / shard["file"]
    if not path.is_file():
        return [f"{shard['file']}: missing"]
    problems = []
    if sha256_file(path) != shard["sha256"]:
        problems.append(f"{shard['file']}: sha256 mismatch")
    with safe_open(path, framework="pt") as f:
        acts, toks = f.get_slice("activations"), f.get_slice("token_ids")
        want = [shard["n_seq"], context_size, hook["d"]]
        if list(acts.get_shape()) != want or acts.get_dtype() != _st_dtype(hook["dtype"]):
            problems.append(f"{shard['file']}: activations {acts.get_shape()} != {want}")
        if list(toks.get_shape()) != want[:2] or toks.get_dtype() != "I32":
            problems.append(f"{shard['file']}: token_ids {toks.get_shape()} != {want[:2]}")
    return problems


def _st_dtype(name: str) -> str:
    return {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}.get(name, name)


def verify(out_dir: Path) -> list[str]:
    """Recompute every listed shard's sha256 and check shapes/dtypes; returns problems (empty: ok).

    Also checks that shard k of every hook holds the same number of sequences and that the counts
    add up to the manifest's n_sequences.
    """
    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir)
    problems = []
    for hook in manifest["hooks"]:
        for shard in hook["shards"]:
            problems += _verify_shard(out_dir, hook, shard, manifest["context_size"])
        if sum(s["n_seq"] for s in hook["shards"]) != manifest["n_sequences"]:
            problems.append(f"{hook['name']}: shard n_seq do not add up to n_sequences")
    counts = {tuple(s["n_seq"] for s in h["shards"]) for h in manifest["hooks"]}
    if len(counts) > 1:
        problems.append("hooks disagree on the number of sequences per shard")
    return problems


def remove_partial(out_dir: Path) -> None:
    """Delete everything an unfinished extraction wrote: shards, temp files and the manifest."""
    out_dir = Path(out_dir)
    shutil.rmtree(out_dir / SHARDS_DIR, ignore_errors=True)
    for path in (out_dir / MANIFEST_NAME, *out_dir.glob(_TMP_PREFIX + "*")):
        path.unlink(missing_ok=True)
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        out_dir.rmdir()


@dataclass
class Slot:
    """One batch of staged activations: buffers[name] (B, T, d); `n` rows are valid."""

    buffers: dict[str, torch.Tensor]
    token_ids: torch.Tensor | None = None  # (n, T) int32, CPU
    n: int = 0
    event: object | None = None  # torch.cuda.Event recorded after the copies were queued


class StagingPool:
    """A fixed number of batch-sized host buffers per hook, reused for the whole extraction.

    `acquire` blocks while every slot is in flight: this is the back-pressure that bounds memory.
    """

    def __init__(
        self,
        n_slots: int,
        shapes: dict[str, tuple[int, int, int]],
        dtype: torch.dtype,
        pin: bool,
    ):
        self._free: queue.Queue[Slot] = queue.Queue()
        for _ in range(n_slots):
            buffers = {
                name: torch.empty(shape, dtype=dtype, pin_memory=pin)  # (B, T, d)
                for name, shape in shapes.items()
            }
            self._free.put(Slot(buffers))

    def acquire(self) -> Slot:
        return self._free.get()

    def release(self, slot: Slot) -> None:
        slot.n, slot.token_ids, slot.event = 0, None, None
        self._free.put(slot)


@dataclass
class HookBuffer:
    """The one shard-sized buffer of a hook and the manifest records of its written shards."""

    data: torch.Tensor  # (S, T, d)
    records: list[dict] = field(default_factory=list)


class ShardWriter:
    """Fills one shard buffer per hook from staged batches; writes shard k of every hook at once.

    Runs on a background thread (`start`/`submit`/`finish`); errors raised there are re-raised in
    the main thread at the next `submit` or at `finish`.
    """

    def __init__(
        self,
        out_dir: Path,
        dims: dict[str, int],
        context_size: int,
        shard_sequences: int,
        dtype: torch.dtype,
        stats: dict[str, SiteStats],
        release: Callable[[Slot], None],
        max_pending: int,
    ):
        self.out_dir = Path(out_dir)
        self.hooks = {
            name: HookBuffer(torch.empty((shard_sequences, context_size, d), dtype=dtype))
            for name, d in dims.items()
        }  # (S, T, d) per hook
        self.tokens = torch.empty((shard_sequences, context_size), dtype=torch.int32)  # (S, T)
        self.filled = 0
        self.stats = stats  # updated by the main thread; read here for the inf/NaN check
        self.release = release
        self.error: BaseException | None = None
        self._queue: queue.Queue[Slot | None] = queue.Queue(maxsize=max_pending)
        self._thread = threading.Thread(target=self._run, name="shard-writer", daemon=True)
        self._aborted = False

    def start(self) -> ShardWriter:
        self._thread.start()
        return self

    def submit(self, slot: Slot) -> None:
        """Queue one staged batch (blocks when `max_pending` batches are waiting)."""
        self.raise_if_failed()
        self._queue.put(slot)

    def raise_if_failed(self) -> None:
        if self.error is not None:
            raise self.error

    def finish(self) -> dict[str, list[dict]]:
        """Write the last partial shard, stop the thread; returns {hook name: shard records}."""
        self._queue.put(None)
        self._thread.join()
        self.raise_if_failed()
        return {name: buf.records for name, buf in self.hooks.items()}

    def abort(self) -> None:
        """Stop without writing what is buffered (cancel or failure); waits for the thread."""
        self._aborted = True
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def _run(self) -> None:
        with ThreadPoolExecutor(min(len(self.hooks), IO_THREADS), "shard-io") as self._io:
            self._drain()

    def _drain(self) -> None:
        while (slot := self._queue.get()) is not None:
            try:
                if self.error is None and not self._aborted:
                    self._consume(slot)
            except BaseException as exc:  # re-raised in the main thread
                self.error = exc
            finally:
                self.release(slot)
        try:
            if self.error is None and not self._aborted and self.filled:
                self._flush()
        except BaseException as exc:
            self.error = exc

    def _consume(self, slot: Slot) -> None:
        if slot.event is not None:
            slot.event.synchronize()  # the non_blocking device->host copies have landed
        self._check_finite()
        start = 0
        while start < slot.n:  # a batch may straddle two shards
            take = min(slot.n - start, self.tokens.shape[0] - self.filled)
            rows = slice(self.filled, self.filled + take)
            _copy_rows(self.tokens[rows], slot.token_ids[start : start + take])
            for name, buf in self.hooks.items():
                _copy_rows(buf.data[rows], slot.buffers[name][start : start + take])
            self.filled += take
            start += take
            if self.filled == self.tokens.shape[0]:
                self._flush()

    def _check_finite(self) -> None:
        for name, stats in self.stats.items():
            if stats.nonfinite:
                raise NonFiniteError(name, stats.nonfinite)

    def _flush(self) -> None:
        """Write shard k of every hook, the hooks in parallel (see IO_THREADS)."""
        n = self.filled

        def write(item: tuple[str, HookBuffer]) -> dict:
            name, buf = item
            relpath = shard_relpath(name, len(buf.records))
            return write_shard(self.out_dir, relpath, buf.data[:n], self.tokens[:n])

        items = list(self.hooks.items())
        for (_, buf), record in zip(items, self._io.map(write, items), strict=True):
            buf.records.append(record)
        self.filled = 0


def _copy_rows(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst[...] = src through numpy: a plain memcpy that releases the GIL.

    A torch copy here would start a second OpenMP team next to the forward's (measured on 2 CPU
    cores: the extraction fell from 70% to 45% of the bare forward rate).
    """
    if dst.dtype == torch.bfloat16:  # numpy has no bfloat16: copy the bits
        dst, src = dst.view(torch.int16), src.view(torch.int16)
    np.copyto(dst.numpy(), src.numpy())


class NonFiniteError(StorageError):
    """inf/NaN values in a hook's activations: a hard failure, nothing is kept."""

    def __init__(self, hook_name: str, count: int):
        super().__init__(f"{count} inf/NaN values in {hook_name}: activations are not finite")
        self.hook_name, self.count = hook_name, count
