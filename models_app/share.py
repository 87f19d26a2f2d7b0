"""Share: push a completed extraction to a Hugging Face dataset repo, with a dataset card.

    push = extraction_push(extraction_id, "me/gpt2-acts", token)   # queues push_run(push.pk)

The token travels as a gated download's does: sealed in PushCredential while the push waits and
runs, unsealed by the worker, dropped when the push ends (whatever the outcome); the task gets the
push's id only. The upload is huggingface_hub's own (`create_repo`, then one `create_commit` of
the manifest, every shard it lists and a README.md generated from it); each file goes as an
open file object whose reads are counted, so bytes move on the websocket and in the CLI's bar.
A push ends `completed` with the repo's URL and commit, or `failed` with the Hub's reason.
"""

from __future__ import annotations

import io
import json
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from django.conf import settings
from django.db import connections
from django.utils import timezone
from huggingface_hub import CommitOperationAdd, HfApi
from huggingface_hub.errors import HfHubHTTPError

from mistudio.errors import Conflict, Invalid
from mistudio.jobs import ByteRate, enqueue

from .ml.card import dataset_card
from .models import ExtractionStatus, PushCredential, PushJob, PushStatus
from .selectors import extraction_get

log = logging.getLogger(__name__)

WAITING = "waiting for a download worker"
UPLOADING = "uploading"
COMMITTING = "committing: every file is sent, the Hub is writing the commit"


def enqueue_push(push_id: str) -> None:
    enqueue("models_app.tasks.push_run_task", push_id, cluster=settings.DOWNLOAD_CLUSTER)


def push_files(output_path: str | Path, manifest: dict) -> list[tuple[str, Path, str | None]]:
    """(path in repo, local file, sha256 or None) of what a push sends besides the card:
    manifest.json and every shard the manifest lists, in its order."""
    root = Path(output_path)
    files: list[tuple[str, Path, str | None]] = [("manifest.json", root / "manifest.json", None)]
    for hook in manifest.get("hooks") or []:
        files += [(s["file"], root / s["file"], s.get("sha256")) for s in hook.get("shards", [])]
    return files


def extraction_push(
    extraction_id: str,
    repo_id: str,
    token: str | None,
    private: bool = True,
    *,
    enqueue: bool = True,
) -> PushJob:
    """Queue a push of completed extraction `extraction_id` to dataset repo `repo_id`.

    `repo_id` and `token` are validated by `schemas.PushIn`. Raises NotFound (404) for an unknown
    extraction, Conflict (409) when it is not completed, its files are gone or a push of it is
    running, Invalid (422) without a token. `enqueue=False` leaves the push queued for the caller
    to run in-process (the CLI). Returns the queued row (bytes_total: every file but the card)."""
    job = extraction_get(extraction_id)
    if job.status != ExtractionStatus.COMPLETED or not job.manifest:
        raise Conflict(f"Extraction {job.pk} is {job.status}; only a completed one can be pushed.")
    if not token:
        raise Invalid("A Hugging Face access token with write access is needed to push.",
                      code="token_required")  # fmt: skip
    files = push_files(job.output_path, job.manifest)
    missing = [name for name, path, _ in files if not path.is_file()]
    if missing:
        raise Conflict(f"The extraction's files are gone from disk ({missing[0]}); extract again.")
    return PushJob.create_queued(
        task=enqueue_push if enqueue else None,
        conflict=f"Extraction {job.pk} is being pushed already; wait for that push to end.",
        token=token,
        tokens=PushCredential,
        extraction=job,
        repo_id=repo_id,
        private=private,
        phase=WAITING,
        bytes_total=sum(path.stat().st_size for _, path, _ in files),
        files_total=len(files) + 1,
    )


def push_run(push_id: str) -> None:
    """The push job (download cluster): create the repo, send the files, end the row.

    Ends `completed` (repo_url, commit_sha) or `failed` with the reason; the token is dropped
    either way. A second delivery of the task does nothing."""
    if not PushJob.claim(push_id, from_status=PushStatus.QUEUED, status=PushStatus.RUNNING,
                         phase="creating the repo", progress=0, bytes_done=0):  # fmt: skip
        return
    row = PushJob.objects.select_related("extraction").get(pk=push_id)
    token = PushCredential.token_for(push_id)
    try:
        if token is None:
            raise PushFailed("The access token could not be read back (the server's key changed);"
                             " push again with your token.")  # fmt: skip
        with PushJob.heartbeat(push_id):
            url, commit = _push(row, token)
    except Exception as exc:  # noqa: BLE001 - every failure ends the row with its reason
        push_fail(push_id, _reason(exc, row.repo_id, token))
        return
    finally:
        PushCredential.drop(push_id)
        token = None
    PushJob.touch(
        push_id,
        status=PushStatus.COMPLETED,
        phase="",
        progress=100.0,
        repo_url=url,
        commit_sha=commit,
        eta_seconds=None,
        speed_bps=0,
        finished_at=timezone.now(),
    )


def push_fail(push_id: str, message: str) -> None:
    """End push `push_id` as failed with `message` (and drop its token)."""
    log.warning("push %s failed: %s", push_id, message)
    PushCredential.drop(push_id)
    PushJob.touch(push_id, status=PushStatus.FAILED, error_message=message, phase="",
                  eta_seconds=None, speed_bps=0, finished_at=timezone.now())  # fmt: skip


class PushFailed(Exception):
    """A push cannot go on; the message is the user's."""


def _push(row: PushJob, token: str) -> tuple[str, str]:
    """Create the repo (private unless asked otherwise; an existing one of the token's is reused)
    and commit manifest, shards and card in one commit. Returns (repo URL, commit sha)."""
    extraction = row.extraction
    manifest = manifest_checked(extraction.output_path, extraction.manifest)
    api = HfApi(endpoint=settings.HF_ENDPOINT, token=token, library_name="mistudio")
    url = api.create_repo(row.repo_id, repo_type="dataset", private=row.private, exist_ok=True)
    counter = ByteCounter()
    PushJob.touch(row.pk, phase="checking the files")
    operations: list[CommitOperationAdd] = []
    try:
        for name, path, sha in push_files(extraction.output_path, manifest):
            operations.append(_operation(name, path, sha, counter))
        card = dataset_card(manifest, repo_id=row.repo_id, endpoint=settings.HF_ENDPOINT)
        operations.append(CommitOperationAdd("README.md", card.encode()))
        PushJob.touch(row.pk, phase=UPLOADING)
        with _progress(row.pk, row.bytes_total, counter):
            info = api.create_commit(
                row.repo_id,
                operations,
                repo_type="dataset",
                commit_message=f"Activations of {manifest.get('model', {}).get('repo')}"
                f" (miStudio extraction {extraction.pk})",
            )
    finally:
        for op in operations:
            if isinstance(op.path_or_fileobj, io.IOBase):
                op.path_or_fileobj.close()
    return str(url), info.oid


def manifest_checked(output_path: str | Path, recorded: dict) -> dict:
    """The extraction's manifest as recorded in the database, once manifest.json on disk says
    the same (parsed JSON compared). PushFailed naming manifest.json when it is unreadable or
    differs (altered on disk): a push never trusts the file alone."""
    try:
        on_disk = json.loads((Path(output_path) / "manifest.json").read_text())
    except (OSError, ValueError) as exc:
        raise PushFailed(f"manifest.json could not be read ({type(exc).__name__});"
                         " nothing was pushed.") from exc  # fmt: skip
    if on_disk != recorded:
        raise PushFailed("manifest.json differs from the extraction's record (altered on disk);"
                         " nothing was pushed.")  # fmt: skip
    return recorded


def _operation(name: str, path: Path, sha256: str | None, counter: ByteCounter):
    """An upload of `path` as `name` whose content counts as sent once read out whole; PushFailed
    when the bytes on disk are not the ones the manifest lists."""
    fileobj = open(path, "rb")  # noqa: SIM115 - closed by _push (a file object keeps the LFS path)
    try:
        op = _CountedAdd(name, fileobj)
    except BaseException:
        fileobj.close()
        raise
    if sha256 is not None and op.upload_info.sha256.hex() != sha256:
        fileobj.close()
        raise PushFailed(f"{name} differs from the sha256 the manifest lists (altered on disk);"
                         " nothing was pushed.")  # fmt: skip
    op.local, op.counter = path, counter
    counter.expect(op.upload_info.sha256.hex(), op.upload_info.size)
    return op


class _CountedAdd(CommitOperationAdd):
    """A CommitOperationAdd of a local file that hands huggingface_hub a fresh file object on
    every `as_file()` (its uploads and its commit payload read through it): identical files
    (one LFS object, possibly uploaded by several threads) or a retried upload never share
    one. A read that ends without error marks the content sent in `counter`.

    It is built on an open file object, not a path, so huggingface_hub takes the LFS route (the
    one the fake hub speaks) and not Xet."""

    local: Path
    counter: ByteCounter

    @contextmanager
    def as_file(self, with_tqdm: bool = False) -> Iterator[BinaryIO]:  # noqa: ARG002 - no bar
        with open(self.local, "rb") as fileobj:
            yield fileobj
        self.counter.sent(self.upload_info.sha256.hex())


class ByteCounter:
    """Bytes of the files whose content has been sent (thread-safe). A file counts whole once
    huggingface_hub has read it out for an upload the Hub answered (LFS) or into the commit
    (small files), so the figure moves file by file and never runs ahead of the Hub. Identical
    files are one object on the Hub: they count together when it is sent."""

    def __init__(self) -> None:
        self.sizes: dict[str, int] = {}  # sha256 → bytes of every file with that content
        self.sent_oids: set[str] = set()
        self._lock = threading.Lock()

    def expect(self, oid: str, size: int) -> None:
        self.sizes[oid] = self.sizes.get(oid, 0) + size

    def sent(self, oid: str) -> None:
        with self._lock:
            self.sent_oids.add(oid)

    @property
    def done(self) -> int:
        with self._lock:
            return sum(self.sizes.get(oid, 0) for oid in self.sent_oids)

    @property
    def phase(self) -> str:
        """UPLOADING while files remain to send, then COMMITTING (the Hub writes the commit)."""
        with self._lock:
            return COMMITTING if self.sent_oids >= self.sizes.keys() else UPLOADING


class _progress:  # noqa: N801 - used as a context manager
    """Writes the counter to the row every 0.25 s from one thread while the upload runs (the
    upload reads files in huggingface_hub's own threads), and once more at the end."""

    def __init__(self, push_id: str, total: int, counter: ByteCounter):
        self.tracker = ByteRate(
            lambda **kw: PushJob.touch(push_id, phase=counter.phase, **kw), total
        )
        self.counter, self.total = counter, total
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"push-{push_id}", daemon=True)

    def _run(self) -> None:
        try:
            while not self.stop.wait(0.25):
                self.tracker(min(self.counter.done, self.total))
        finally:
            connections.close_all()  # this thread's own

    def __enter__(self) -> _progress:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(timeout=10)
        if exc[0] is None:
            self.tracker(self.total)
            self.tracker.flush()


def _reason(exc: BaseException, repo_id: str, token: str | None) -> str:
    """The user's sentence for why a push failed (the token never in it)."""
    message = _reason_text(exc, repo_id)
    return message.replace(token, "[token]") if token else message


def _reason_text(exc: BaseException, repo_id: str) -> str:
    if isinstance(exc, PushFailed):
        return str(exc)
    http = _first(exc, HfHubHTTPError)
    if http is not None and http.response is not None:
        status = http.response.status_code
        said = (http.server_message or "").strip().splitlines()[0:1]
        detail = f" The Hub said: {said[0]}" if said else ""
        if status == 401:
            return ("The Hub refused the access token (401): it is invalid or expired."
                    " Check it and push again." + detail)  # fmt: skip
        if status == 403:
            return (f"The access token may not write to {repo_id} (403): it needs write access"
                    " to that owner's repos." + detail)  # fmt: skip
        return f"The Hub answered {status} while pushing to {repo_id}.{detail}"
    if _first(exc, OSError) is not None or _is_transport(exc):
        return f"Could not reach the Hub at {settings.HF_ENDPOINT}: {_root(exc)}"
    return f"The push failed: {_root(exc)}"


def _is_transport(exc: BaseException) -> bool:
    """Whether the chain holds an HTTP client's transport error (no answer from the Hub)."""
    while exc is not None:
        if (
            type(exc).__module__.startswith(("httpx", "httpcore"))
            and "Status" not in type(exc).__name__
        ):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _first(exc: BaseException, kind: type):
    """`exc` or the first exception of its cause/context chain that is a `kind`."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, kind):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _root(exc: BaseException) -> str:
    """The innermost exception's type and message, on one line."""
    while (exc.__cause__ or exc.__context__) is not None:
        exc = exc.__cause__ or exc.__context__
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
