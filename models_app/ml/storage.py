"""On-disk activation format (architecture.md §5) and the bounded, threaded writer that produces it.

    <out>/manifest.json                                  written last, atomically
    <out>/shards/<hook name>/<k:06d>.safetensors
        activations  [n_seq, context_size, *shape]   float32 on CPU, bfloat16 by default on GPU
                     (shape = [d] for the residual sites, [n_heads, d_head] for hook_z)
        token_ids    [n_seq, context_size]      int32

Shard k holds the same sequences for every hook. Each shard is written to a hidden temp name,
fsynced, then renamed; its sha256 is taken from the bytes on disk. The manifest comes last, after
the shard directories were fsynced; a reader trusts only the shards the manifest lists.

Memory: the main thread copies hooked tensors into a small pool of batch-sized staging slots
(pinned host memory with non_blocking copies on a side stream on CUDA); a writer thread appends
each slot to shard k of every hook (the hooks' files side by side, IO_THREADS at a time), hashing
the bytes as it writes them, and closes the shard when it is full. Host memory is therefore
pool slots × batch (+ the token ids of one shard), whatever the dataset and shard sizes. The
writer runs no torch kernels (file writes and hashing only, which release the GIL). On CUDA it
works while the GPU computes; on the CPU (one slot, see extract.POOL_SLOTS) the forward waits
for it, since a writer beside a CPU forward preempts the forward's OpenMP threads. Each append
starts the disk's writeback, so the fsync at close has little left to wait for.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import queue
import shutil
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from .stats import SiteStats

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
SHARDS_DIR = "shards"
STORAGE_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Bytes of one shard file of one hook, unless the caller asks for another size. Shards are written
# from batch-sized staging slots, so host memory does not depend on it; it sets how fine-grained
# the files are for readers (and how much a crash loses).
DEFAULT_SHARD_BYTES = 32 * 2**20
_TMP_PREFIX = ".tmp-"
# Threads writing the hooks' files at once. Writes, hashing and fsync release the GIL, so the
# files are written side by side: on a GPU host the writer keeps up with a faster forward.
IO_THREADS = 4


class StorageError(RuntimeError):
    """A shard or manifest that cannot be written or does not match what was recorded."""


def dtype_name(dtype: torch.dtype) -> str:
    """'float32' for torch.float32, etc."""
    return str(dtype).removeprefix("torch.")


def storage_dtype(device: torch.device | str, requested: str | None = None) -> torch.dtype:
    """The dtype shards are stored in: `requested` (a STORAGE_DTYPES name) if given, else float32
    on CPU (what CPU compute uses) and bfloat16 on a GPU (half the bytes, the range of float32)."""
    if requested is not None:
        return STORAGE_DTYPES[requested]
    kind = device.type if isinstance(device, torch.device) else str(device).split(":")[0]
    return torch.float32 if kind == "cpu" else torch.bfloat16


def sequence_bytes(d: int, context_size: int, dtype: torch.dtype) -> int:
    """Bytes one sequence adds to one hook's shard: activations (T, d) + int32 token ids (T)."""
    return context_size * (d * dtype.itemsize + 4)


def shard_sequences_for(
    d: int, context_size: int, dtype: torch.dtype, *, max_samples: int, shard_bytes: int | None
) -> int:
    """Sequences per shard so that one shard of one hook is about `shard_bytes` (default
    DEFAULT_SHARD_BYTES), at least 1 and at most `max_samples`."""
    per_seq = sequence_bytes(d, context_size, dtype)
    return max(1, min(max_samples, (shard_bytes or DEFAULT_SHARD_BYTES) // per_seq))


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
        want = [shard["n_seq"], context_size, *hook.get("shape", [hook["d"]])]
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
    # CUDA: each hook's inf/NaN count so far, copied with the batch (pinned, in buffers' order),
    # so that checking it needs no GPU synchronisation; without an event (CPU) the statistics are
    # read directly.
    nonfinite: torch.Tensor | None = None  # (n_hooks,) int64
    # width w -> (S_w, B, T, w): the buffers of the hooks of that width, stacked (see StagingPool)
    stacks: dict[int, torch.Tensor] = field(default_factory=dict)

    def nonfinite_counts(self, stats: dict[str, SiteStats]) -> dict[str, int]:
        """{hook name: inf/NaN values seen up to this batch}."""
        if self.event is not None:  # copied with the batch, which the event covers
            return dict(zip(self.buffers, self.nonfinite.tolist(), strict=True))
        return {name: stats[name].nonfinite for name in self.buffers}


class StagingPool:
    """A fixed number of batch-sized host buffers per hook, reused for the whole extraction.

    The hooks whose token vectors have the same width w share one buffer (S_w, B, T, w) per slot
    (`Slot.stacks`); each hook's buffer is a view of it, so the statistics read every site of a
    width in one stacked call without a copy. `acquire` blocks while every slot is in flight:
    this is the back-pressure that bounds memory.
    """

    def __init__(
        self,
        n_slots: int,
        shapes: dict[str, tuple[int, ...]],  # (B, T, d) or (B, T, H, d_head)
        dtype: torch.dtype,
        pin: bool,
    ):
        groups: dict[int, list[str]] = {}  # width -> hook names, in the order of `shapes`
        for name, shape in shapes.items():
            groups.setdefault(math.prod(shape[2:]), []).append(name)
        self._free: queue.Queue[Slot] = queue.Queue()
        for _ in range(n_slots):
            stacks, buffers = {}, {}
            for width, names in groups.items():
                b, t = shapes[names[0]][:2]
                stack = torch.empty((len(names), b, t, width), dtype=dtype, pin_memory=pin)
                stacks[width] = stack  # (S_w, B, T, w)
                buffers |= {n: stack[i].view(shapes[n]) for i, n in enumerate(names)}
            counts = torch.zeros(len(shapes), dtype=torch.int64, pin_memory=pin)
            buffers = {name: buffers[name] for name in shapes}  # the caller's order
            self._free.put(Slot(buffers, nonfinite=counts, stacks=stacks))

    def acquire(self) -> Slot:
        return self._free.get()

    def release(self, slot: Slot) -> None:
        slot.n, slot.token_ids, slot.event = 0, None, None
        self._free.put(slot)


def copy_on_stream(stream, dst: torch.Tensor, src: torch.Tensor) -> None:
    """Queue dst.copy_(src) (device -> pinned host) on `stream` after the work that produced src.

    `record_stream` keeps src's memory from being reused by the forward until the copy ran.
    """
    stream.wait_stream(torch.cuda.current_stream(src.device))
    with torch.cuda.stream(stream):
        dst.copy_(src, non_blocking=True)
    src.record_stream(stream)


class ShardFile:
    """Shard k of one hook, written straight from staged batches: no shard-sized buffer.

    safetensors layout: 8-byte header length, JSON header padded with spaces to a fixed length,
    activations (n, T, d), then token_ids (n, T). The header is that of a full shard, so the
    sha256 is taken from the bytes as they are written (no second read); a short last shard
    rewrites its header in place (same length) and is hashed from disk.
    """

    def __init__(self, out_dir: Path, relpath: str, capacity: int, context_size: int,
                 d: int | tuple[int, ...], dtype: torch.dtype):  # fmt: skip
        trailing = (d,) if isinstance(d, int) else tuple(d)  # one vector: (d,) or (H, d_head)
        self.relpath, self.capacity, self.shape = relpath, capacity, (context_size, *trailing)
        self.dtype, self.n = dtype, 0
        self.final = out_dir / relpath
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.final.with_name(_TMP_PREFIX + self.final.name)
        self.file = open(self.tmp, "wb", buffering=0)  # noqa: SIM115 - closed by close/discard
        self.hash = hashlib.sha256()
        header = self._header(capacity)
        self.header_len = len(header)
        self._write(header)

    def _header(self, n: int, length: int | None = None) -> bytes:
        """The 8-byte length and the JSON header of a shard of n sequences, padded to `length`."""
        (t, *rest), dtype = self.shape, _st_dtype(dtype_name(self.dtype))
        acts, ids = n * math.prod(self.shape) * self.dtype.itemsize, n * t * 4  # bytes
        head = {
            "activations": {"dtype": dtype, "shape": [n, t, *rest], "data_offsets": [0, acts]},
            "token_ids": {"dtype": "I32", "shape": [n, t], "data_offsets": [acts, acts + ids]},
        }
        text = json.dumps(head, separators=(",", ":")).encode()
        text = text.ljust(length or -(-len(text) // 8) * 8)  # safetensors pads with spaces
        return len(text).to_bytes(8, "little") + text

    def _write(self, data) -> None:
        view = memoryview(data).cast("B")
        while view:  # an unbuffered file may write less than asked
            view = view[self.file.write(view) :]
        self.hash.update(data)

    def append(self, rows: torch.Tensor) -> None:
        """Add rows (k, T, *shape), a contiguous CPU tensor of the shard's dtype."""
        self._write(_bytes_of(rows))
        self.n += rows.shape[0]
        _start_writeback(self.file.fileno())

    def close(self, token_ids: torch.Tensor) -> dict:
        """Write token_ids (n, T) int32, fsync, rename; returns {file, n_seq, bytes, sha256}."""
        self._write(_bytes_of(token_ids))
        if self.n < self.capacity:  # a short last shard: its own header, same length
            self.file.seek(0)
            self.file.write(self._header(self.n, self.header_len - 8))
        os.fsync(self.file.fileno())
        self.file.close()
        sha = self.hash.hexdigest() if self.n == self.capacity else sha256_file(self.tmp)
        size = self.tmp.stat().st_size
        os.replace(self.tmp, self.final)
        return {"file": self.relpath, "n_seq": self.n, "bytes": size, "sha256": sha}

    def discard(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


def _start_writeback(fd: int) -> None:
    """Start writing what this file holds to the disk now, and let the page cache drop what is
    already there (Linux: POSIX_FADV_DONTNEED starts an asynchronous writeback of dirty pages,
    then drops the clean ones). The fsync at close then waits for the last batch only, not for
    the whole shard, so the disk works while the forward runs; and an extraction does not fill
    the page cache (shared with the model on a Jetson) with shards it will not read back."""
    if hasattr(os, "posix_fadvise"):  # not on macOS or Windows: the fsync does it all
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def _bytes_of(t: torch.Tensor):
    """The raw bytes of a contiguous CPU tensor, without a copy (numpy has no bfloat16)."""
    return t.contiguous().view(torch.uint8).numpy()


class ShardWriter:
    """Appends staged batches to shard k of every hook; closes them together when full.

    Runs on a background thread (`start`/`submit`/`finish`); errors raised there are re-raised in
    the main thread at the next `submit` or at `finish`. Each hook's file is written (and hashed)
    on an IO thread of its own, straight from the staging slot.
    """

    def __init__(
        self,
        out_dir: Path,
        dims: dict[str, int | tuple[int, ...]],  # hook name -> d, or the shape of one vector
        context_size: int,
        shard_sequences: int,
        dtype: torch.dtype,
        stats: dict[str, SiteStats],
        release: Callable[[Slot], None],
        max_pending: int,
        first_shard: int = 0,  # the number of the first shard written (a part starts later)
    ):
        self.out_dir = Path(out_dir)
        self.first_shard = first_shard
        self.dims, self.context_size, self.dtype = dims, context_size, dtype
        self.capacity = shard_sequences
        self.records: dict[str, list[dict]] = {name: [] for name in dims}
        self.files: dict[str, ShardFile] | None = None  # the shard being written
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
        """Close the last partial shard, stop the thread; returns {hook name: shard records}."""
        self._queue.put(None)
        self._thread.join()
        self.raise_if_failed()
        return self.records

    def abort(self) -> None:
        """Stop without keeping what is unfinished (cancel or failure); waits for the thread."""
        self._aborted = True
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def _run(self) -> None:
        with ThreadPoolExecutor(min(len(self.dims), IO_THREADS), "shard-io") as self._io:
            try:
                self._drain()
            finally:
                self._discard()

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
                self._close_shard()
        except BaseException as exc:
            self.error = exc

    def _consume(self, slot: Slot) -> None:
        if slot.event is not None:
            slot.event.synchronize()  # the non_blocking device->host copies have landed
        self._check_finite(slot)
        start = 0
        while start < slot.n:  # a batch may straddle two shards
            take = min(slot.n - start, self.capacity - self.filled)
            rows = slice(start, start + take)
            self.tokens[self.filled : self.filled + take] = slot.token_ids[rows]
            files = self.files = self.files or self._open_shard()
            self._each(lambda name: files[name].append(slot.buffers[name][rows]))  # noqa: B023
            self.filled += take
            start += take
            if self.filled == self.capacity:
                self._close_shard()

    def _check_finite(self, slot: Slot) -> None:
        for name, count in slot.nonfinite_counts(self.stats).items():
            if count:
                raise NonFiniteError(name, count)

    def _open_shard(self) -> dict[str, ShardFile]:
        k = self.first_shard + len(next(iter(self.records.values())))
        return {
            name: ShardFile(self.out_dir, shard_relpath(name, k), self.capacity,
                            self.context_size, d, self.dtype)
            for name, d in self.dims.items()
        }  # fmt: skip

    def _close_shard(self) -> None:
        files, tokens = self.files, self.tokens[: self.filled]
        for name, record in zip(files, self._each(lambda n: files[n].close(tokens)), strict=True):
            self.records[name].append(record)
        self.files, self.filled = None, 0

    def _each(self, fn: Callable[[str], object]) -> list:
        """fn(hook name) for every hook, side by side on the IO threads."""
        return list(self._io.map(fn, self.dims))

    def _discard(self) -> None:
        for shard in (self.files or {}).values():
            shard.discard()
        self.files = None


class NonFiniteError(StorageError):
    """inf/NaN values in a hook's activations: a hard failure, nothing is kept."""

    def __init__(self, hook_name: str, count: int):
        super().__init__(f"{count} inf/NaN values in {hook_name}: activations are not finite")
        self.hook_name, self.count = hook_name, count
