"""File bytes from the Hub through our own transfer loop, never trusting what the server says.

huggingface_hub's `hf_hub_download` builds cache paths from response headers (`X-Repo-Commit`,
`ETag`), trusts `Content-Length`, and resets its retries whenever a byte arrives, so a hostile or
broken endpoint could write outside the cache, overfill the disk or keep a download alive forever.
Here every path comes from a listing `mistudio.hub` has already validated (a 40-hex commit, a
relative file name, a hex blob id, a size), and the bytes are checked as they arrive:

- a file that grows past its listed size is stopped at once;
- no new byte for `stall_s` seconds ends the transfer (a slow but moving one never does);
- dropped connections and 5xx answers are retried with a Range request a few times, counted
  only while no new byte arrives; a server that ignores Range is read again from the start;
- the finished file must match its listed checksum (LFS sha256, else the git blob id);
- partial bytes live in `<blob>.incomplete` (the HF cache's own name) and are removed on failure.

Each call opens its own HTTP client and closes it when done, so a cancelled transfer never leaves
a half-read connection in a pool another request would pick up. No Django here.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
from filelock import FileLock, Timeout
from huggingface_hub import hf_hub_url
from huggingface_hub.utils import build_hf_headers

CHUNK_BYTES = 1024 * 1024  # cancel granularity at a fast link
PROGRESS_BYTES = 256 * 1024
# At a slow link the byte thresholds take seconds to reach: the cancel flag (a database read) and
# the progress report are also due every POLL_S while bytes arrive, so the bar moves and a cancel
# takes effect at once at any rate.
POLL_S = 0.25
RETRIES = 5  # failed attempts in a row without a new byte before we give up
CONNECT_TIMEOUT_S = 15.0


class TransferError(Exception):
    """A transfer failed; `message` is user-facing, `code`/`status` as HubError's."""

    def __init__(self, message: str, *, code: str, status: int = 422):
        super().__init__(message)
        self.message, self.code, self.status = message, code, status


class TransferCancelled(Exception):  # noqa: N818 - an outcome, not an error
    """`should_cancel()` answered True while bytes were moving."""


@dataclass(frozen=True)
class Wanted:
    """One file to fetch, every field already validated by mistudio.hub."""

    repo_id: str
    repo_type: str
    commit: str  # 40 hex
    name: str  # relative, '/'-separated, no '..'
    size: int  # bytes, as listed
    blob: str  # 64-hex sha256 (LFS) or 40-hex git blob id


def _hasher(blob: str, size: int):
    """A digest whose hexdigest() must equal `blob`: sha256 of the bytes for LFS files, the git
    blob id (sha1 of 'blob <size>\\0' + bytes) otherwise."""
    if len(blob) == 64:
        return hashlib.sha256()
    h = hashlib.sha1()
    h.update(b"blob %d\0" % size)
    return h


def _inside(root: Path, path: Path) -> bool:
    root_abs = Path(os.path.abspath(root))
    return root_abs in Path(os.path.abspath(path)).parents


class _Attempt:
    """State of one file across attempts: bytes on disk, best size reached, its digest."""

    def __init__(self, part: Path, want: Wanted):
        self.part, self.want = part, want
        self.done = 0
        self.best = 0
        self.last_new_byte = time.monotonic()
        self.hasher = _hasher(want.blob, want.size)
        if part.exists() and 0 < part.stat().st_size <= want.size:  # resume an earlier attempt
            with part.open("rb") as fh:
                while chunk := fh.read(CHUNK_BYTES):
                    self.hasher.update(chunk)
            self.done = self.best = part.stat().st_size
        else:
            part.unlink(missing_ok=True)

    def restart(self) -> None:
        self.part.unlink(missing_ok=True)
        self.done = 0
        self.hasher = _hasher(self.want.blob, self.want.size)

    def add(self, chunk: bytes, fh) -> None:
        """Append `chunk` (TransferError when it would pass the listed size)."""
        if self.done + len(chunk) > self.want.size:
            raise TransferError(
                f"{self.want.name} grew past its listed size of {self.want.size:,} bytes; the"
                " download was stopped (the Hub's listing and the file disagree).",
                code="size_mismatch",
            )
        fh.write(chunk)
        self.hasher.update(chunk)
        self.done += len(chunk)
        if self.done > self.best:
            self.best = self.done
            self.last_new_byte = time.monotonic()


def _status_error(status: int, want: Wanted, endpoint: str) -> TransferError | None:
    """The user-facing error for a final HTTP status (None: retry it)."""
    if status == 401:
        return TransferError(
            "The access token is invalid or expired: create a new one at"
            f" {endpoint}/settings/tokens.", code="bad_token", status=401,
        )  # fmt: skip
    if status == 403:
        return TransferError(
            f"The Hub refused {want.name} of {want.repo_id} (HTTP 403): the repo may be gated;"
            " accept its terms and use a token with access.", code="gated", status=403,
        )  # fmt: skip
    if status in (404, 410):
        return TransferError(
            f"{want.name} of {want.repo_id} is not on the Hub.", code="no_file", status=404
        )
    if status == 416 or 500 <= status < 600 or status == 429:
        return None
    return TransferError(
        f"The Hub answered HTTP {status} for {want.name}.", code="hub_http", status=502
    )


def _stalled(want: Wanted, stall_s: float) -> TransferError:
    return TransferError(
        f"The download of {want.name} stalled: no new byte for {stall_s:g} s"
        " (MISTUDIO_HUB_STALL_S); partial files were removed.",
        code="stalled",
        status=504,
    )


def _one_request(client: httpx.Client, url: str, headers: dict, state: _Attempt, *,
                 endpoint: str, on_new: Callable[[int], None],
                 should_cancel: Callable[[], bool]) -> None:  # fmt: skip
    """One GET (resuming with Range when bytes are on disk); appends what arrives. Raises
    TransferError on a final answer, httpx errors on transient ones."""
    want = state.want
    request_headers = dict(headers)
    if state.done:
        request_headers["Range"] = f"bytes={state.done}-"
    with client.stream("GET", url, headers=request_headers) as response:
        if response.status_code == 416 and state.done:
            state.restart()  # the range was refused: read it again from the start
            raise httpx.RemoteProtocolError("range refused", request=response.request)
        error = None if response.status_code in (200, 206) else _status_error(
            response.status_code, want, endpoint
        )  # fmt: skip
        if error is not None:
            raise error
        if response.status_code >= 300:
            raise httpx.RemoteProtocolError(
                f"HTTP {response.status_code}", request=response.request
            )
        if state.done and (response.status_code == 200 or not _range_starts_at(
            response.headers.get("Content-Range", ""), state.done
        )):  # fmt: skip
            state.restart()  # the server ignored Range: this body starts at byte 0
        reported = checked = state.best
        checked_at = reported_at = time.monotonic()
        with state.part.open("ab") as fh:
            for chunk in response.iter_bytes():  # as bytes arrive: a drop loses none of them
                state.add(chunk, fh)
                now = time.monotonic()
                if state.done - checked >= CHUNK_BYTES or now - checked_at >= POLL_S:
                    checked, checked_at = state.done, now
                    if should_cancel():
                        raise TransferCancelled()
                if (state.best - reported >= PROGRESS_BYTES or state.best == want.size
                        or (now - reported_at >= POLL_S and state.best > reported)):  # fmt: skip
                    reported, reported_at = state.best, now
                    on_new(state.best)


def _range_starts_at(content_range: str, start: int) -> bool:
    unit, _, rest = content_range.partition(" ")
    return unit == "bytes" and rest.split("-", 1)[0].strip() == str(start)


def blob_transfer(
    want: Wanted,
    part: Path,
    *,
    token: str | None,
    endpoint: str,
    stall_s: float,
    on_bytes: Callable[[int], None],
    should_cancel: Callable[[], bool],
) -> None:
    """Fetch `want` into `part` (resuming what is there) and check its size and checksum.

    `on_bytes(n)`: bytes of this file received so far (monotonic). Raises TransferCancelled,
    TransferError (message names the file; the partial file is removed), never leaves more
    than `want.size` bytes in `part`."""
    url = hf_hub_url(want.repo_id, want.name, repo_type=want.repo_type, revision=want.commit,
                     endpoint=endpoint)  # fmt: skip
    headers = build_hf_headers(token=token or False, library_name="mistudio")
    headers["Accept-Encoding"] = "identity"  # sizes and checksums are of the stored bytes
    timeout = httpx.Timeout(stall_s, connect=min(CONNECT_TIMEOUT_S, stall_s))
    part.parent.mkdir(parents=True, exist_ok=True)
    state = _Attempt(part, want)
    failures = 0
    try:
        # our own client: a cancel never leaves a half-read connection for another request
        with httpx.Client(follow_redirects=True, timeout=timeout, max_redirects=5) as client:
            while state.done < want.size or not part.exists():
                best_before, completed = state.best, False
                try:
                    _one_request(client, url, headers, state, endpoint=endpoint,
                                 on_new=on_bytes, should_cancel=should_cancel)  # fmt: skip
                    completed = True
                except httpx.ReadTimeout:
                    raise _stalled(want, stall_s) from None
                except httpx.TooManyRedirects:
                    raise TransferError(
                        f"The Hub redirected {want.name} in a loop.", code="hub_http", status=502
                    ) from None
                except httpx.TransportError:
                    pass  # a dropped connection: resume below
                if completed and state.done >= want.size:
                    break
                failures = 0 if state.best > best_before else failures + 1
                if time.monotonic() - state.last_new_byte >= stall_s:
                    raise _stalled(want, stall_s)
                if failures > RETRIES:
                    raise TransferError(
                        f"The download of {want.name} kept failing ({RETRIES + 1} attempts"
                        f" without a new byte, {state.best:,} of {want.size:,} bytes).",
                        code="unreachable", status=502,
                    )  # fmt: skip
                _pause(min(0.25 * 2**failures, 4.0), should_cancel)
        if state.hasher.hexdigest() != want.blob:
            raise TransferError(
                f"{want.name} does not match the checksum the Hub listed for it; the download"
                " was stopped (a corrupt or substituted file).",
                code="checksum",
            )
    except BaseException:
        part.unlink(missing_ok=True)
        raise


def _pause(seconds: float, should_cancel: Callable[[], bool]) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if should_cancel():
            raise TransferCancelled()
        time.sleep(min(0.1, max(end - time.monotonic(), 0)))


def repo_folder(cache_dir: Path, repo_type: str, repo_id: str) -> Path:
    """The HF cache folder of a repo (models--owner--name, datasets--owner--name)."""
    return Path(cache_dir) / f"{repo_type}s--{repo_id.replace('/', '--')}"


@contextlib.contextmanager
def _blob_lock(path: Path, should_cancel: Callable[[], bool]):
    """huggingface_hub's per-blob lock, so another tool fetching the same blob waits for us."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path))
    while True:
        try:
            lock.acquire(timeout=1)
            break
        except Timeout:
            if should_cancel():
                raise TransferCancelled() from None
    try:
        yield
    finally:
        lock.release()


def cache_fetch(want: Wanted, *, cache_dir: Path, **transfer) -> Path:
    """Fetch `want` into the HF cache layout huggingface_hub uses (blobs/<blob>, a relative
    symlink snapshots/<commit>/<name>); return the snapshot entry. A blob already there is only
    linked. `transfer`: blob_transfer's keywords."""
    root = repo_folder(cache_dir, want.repo_type, want.repo_id)
    pointer = root / "snapshots" / want.commit / want.name
    blob = root / "blobs" / want.blob
    if not (_inside(root / "snapshots", pointer) and _inside(root / "blobs", blob)):
        raise TransferError(f"{want.name} is not a file name miStudio writes.", code="bad_name")
    if pointer.exists():
        return pointer
    lock = Path(cache_dir) / ".locks" / root.name / f"{want.blob}.lock"
    with _blob_lock(lock, transfer["should_cancel"]):
        if not (blob.is_file() and blob.stat().st_size == want.size):
            part = blob.with_name(f"{want.blob}.incomplete")
            blob_transfer(want, part, **transfer)
            os.replace(part, blob)
        pointer.parent.mkdir(parents=True, exist_ok=True)
        if not pointer.is_symlink():
            pointer.symlink_to(os.path.relpath(blob, pointer.parent))
    return pointer


def local_fetch(want: Wanted, *, local_dir: Path, **transfer) -> Path:
    """Fetch `want` to `local_dir/<name>` (partial bytes in `<name>.incomplete`); return it."""
    dest = Path(local_dir) / want.name
    if not _inside(Path(local_dir), dest):
        raise TransferError(f"{want.name} is not a file name miStudio writes.", code="bad_name")
    if dest.is_file() and dest.stat().st_size == want.size:
        return dest
    part = dest.with_name(dest.name + ".incomplete")
    blob_transfer(want, part, **transfer)
    os.replace(part, dest)
    return dest
