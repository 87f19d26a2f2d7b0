"""The Hugging Face Hub client every app uses: id checks, one error mapping, listings, downloads.

No Django here: callers pass endpoint, token and folders explicitly (tests point everything at a
loopback fake hub). Every Hub failure becomes a `HubError` whose message tells a researcher what
to do, worded for the kind of repo (model or dataset).
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi, constants, hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id
from tqdm.auto import tqdm

from mistudio.errors import Invalid, is_disk_full, room_check

# owner/name, each part ASCII letters, digits, '.', '_' or '-', not starting with '.' or '-'.
REPO_ID_RE = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9._-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
REVISION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,199}$")
REPO_ID_MAX = 96
BLOB_RE = re.compile(r"^(?:[0-9a-f]{40}|[0-9a-f]{64})$")

# huggingface_hub streams in 10 MiB chunks and reports progress once per chunk: at a slow link
# (100 kB/s) the bar froze for seconds and a cancel waited for the chunk. 64 KiB keeps the bar
# moving and the cancel prompt at any rate. Read at call time.
constants.DOWNLOAD_CHUNK_SIZE = 64 * 1024
# The cancel flag is a database read: polled every CANCEL_POLL_SECONDS or CANCEL_POLL_BYTES,
# whichever comes first (prompt at a slow link, a bounded share of the bytes at a fast one).
CANCEL_POLL_SECONDS = 0.2
CANCEL_POLL_BYTES = 1024 * 1024


class HubError(Invalid):
    """A Hub problem with a user-facing message and the HTTP status our API answers with
    (422 unless a status is given)."""


class DownloadCancelled(Exception):  # noqa: N818 - an outcome, not an error
    """Raised from inside the byte stream when the job was cancelled."""


@dataclass(frozen=True)
class RepoFile:
    name: str  # path inside the repo, '/'-separated
    size: int  # bytes, as the Hub lists it
    blob: str = ""  # the id the HF cache names its blob by (LFS sha256, else git oid); hex


@dataclass(frozen=True)
class Listing:
    """Files of a repo at one commit, as the Hub lists them (or a chosen part of them)."""

    repo_id: str
    commit_sha: str
    files: list[RepoFile]
    gated: bool = False
    repo_type: str = "model"

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def files_json(self) -> list[dict]:
        """[{name, size}] for a job row's `files` column."""
        return [{"name": f.name, "size": f.size} for f in self.files]


def repo_id_clean(raw: object, *, kind: str = "model") -> str:
    """Return the repo id stripped of surrounding spaces, or raise HubError(status=422)."""
    example = f"owner/{kind}-name"
    if not isinstance(raw, str) or not raw.strip():
        raise HubError(f"Enter a Hugging Face repo id such as {example}.", code="invalid")
    repo_id = raw.strip()
    if "://" in repo_id or repo_id.startswith(("www.", "huggingface.co", "hf.co")):
        raise HubError(f"Paste the repo id ({example}), not a URL.", code="invalid")
    if len(repo_id) > REPO_ID_MAX:
        raise HubError(f"A repo id has at most {REPO_ID_MAX} characters.", code="invalid")
    if not repo_id.isascii() or not REPO_ID_RE.fullmatch(repo_id) or ".." in repo_id:
        raise HubError(
            f"A repo id is {example} using letters, digits, '.', '_' and '-' only.",
            code="invalid",
        )
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise HubError(f"Invalid repo id: {exc}", code="invalid") from None
    return repo_id


def revision_clean(raw: object) -> str:
    """A branch, tag or commit sha ('main' when empty); HubError(422) otherwise."""
    if raw is None or raw == "":
        return "main"
    if not isinstance(raw, str) or not REVISION_RE.fullmatch(raw) or ".." in raw:
        raise HubError("A revision is a branch, tag or commit sha.", code="invalid")
    return raw


def hub_error(exc: Exception, repo_id: str, endpoint: str, *, has_token: bool,
              repo_type: str = "model") -> HubError:  # fmt: skip
    """A Hub exception as a HubError worded for a model or dataset repo."""
    what = repo_id if repo_type == "model" else f"The dataset {repo_id}"
    page = f"{endpoint}/{repo_id}" if repo_type == "model" else f"{endpoint}/datasets/{repo_id}"
    if isinstance(exc, GatedRepoError):
        hint = "" if has_token else " and paste an access token"
        terms = "the licence" if repo_type == "model" else "its conditions"
        return HubError(
            f"{what} is gated: accept {terms} at {page}{hint}, then try again.",
            code="gated",
            status=403,
        )
    if isinstance(exc, RepositoryNotFoundError):
        return HubError(
            f"{what} was not found on the Hub, or it is private (a private repo needs a token"
            " with access).",
            code="not_found",
            status=404,
        )
    if isinstance(exc, RevisionNotFoundError):
        return HubError(f"{what} has no such revision.", code="no_revision", status=404)
    if isinstance(exc, EntryNotFoundError):
        return HubError(f"A file of {repo_id} is not on the Hub.", code="no_file", status=404)
    if isinstance(exc, HfHubHTTPError):
        return _http_error(exc, endpoint)
    if is_disk_full(exc):
        return HubError("The disk filled up during the download.", code="disk_full")
    return HubError(
        f"Could not reach the Hub at {endpoint}: {type(exc).__name__}.",
        code="unreachable",
        status=502,
    )


def _http_error(exc: HfHubHTTPError, endpoint: str) -> HubError:
    status = exc.response.status_code if exc.response is not None else None
    if status == 401:
        return HubError(
            "The access token is invalid or expired: create a new one at"
            f" {endpoint}/settings/tokens.",
            code="bad_token",
            status=401,
        )
    if status == 429:
        return HubError("The Hub is rate-limiting requests; try again later.", code="rate")
    return HubError(f"The Hub answered HTTP {status}.", code="hub_http", status=502)


def api(endpoint: str) -> HfApi:
    return HfApi(endpoint=endpoint, library_name="mistudio")


def repo_listing(repo_id: str, *, repo_type: str, revision: str, token: str | None,
                 endpoint: str) -> Listing:  # fmt: skip
    """The repo's files with sizes at `revision` (one Hub call, no file content)."""
    hub = api(endpoint)
    try:
        # the repo's info is public even when its files are gated: ask whether we may read them
        hub.auth_check(repo_id, repo_type=repo_type, token=token or False)
        info = hub.repo_info(
            repo_id, repo_type=repo_type, revision=revision, files_metadata=True,
            token=token or False,
        )  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - every Hub failure is mapped to a message
        raise hub_error(
            exc, repo_id, endpoint, has_token=bool(token), repo_type=repo_type
        ) from None
    files = [RepoFile(s.rfilename, int(s.size or 0), _blob_id(s)) for s in (info.siblings or [])]
    gated = bool(getattr(info, "gated", False))
    return Listing(repo_id, info.sha or revision, files, gated, repo_type)


SEARCH_LIMIT_MAX = 50


def models_search(query: str, *, endpoint: str, token: str | None, limit: int = 20) -> list[dict]:
    """Text-generation models on the Hub whose id contains `query`, most downloaded first:
    [{id, downloads, likes, gated, params (None when the Hub does not count them)}]."""
    try:
        found = api(endpoint).list_models(
            search=query, filter="text-generation", sort="downloads",
            limit=min(limit, SEARCH_LIMIT_MAX), token=token or False,
            expand=["downloads", "likes", "gated", "safetensors", "pipeline_tag"],
        )  # fmt: skip
        models = list(found)
    except Exception as exc:  # noqa: BLE001 - every Hub failure is mapped to a message
        raise hub_error(exc, query, endpoint, has_token=bool(token)) from None
    return [
        {
            "id": m.id,
            "downloads": int(getattr(m, "downloads", 0) or 0),
            "likes": int(getattr(m, "likes", 0) or 0),
            "gated": bool(getattr(m, "gated", False)),
            "params": _params_of(m),
        }
        for m in models
        if isinstance(m.id, str) and REPO_ID_RE.fullmatch(m.id)
    ]


def _params_of(model) -> int | None:
    safetensors = getattr(model, "safetensors", None)
    total = getattr(safetensors, "total", None) if safetensors else None
    return int(total) if isinstance(total, int) and total > 0 else None


def _blob_id(sibling) -> str:
    """The cache's blob name of a listed file: its LFS sha256, else its git oid ("" when the
    listing gives neither as plain hex)."""
    lfs = getattr(sibling, "lfs", None)
    blob = (getattr(lfs, "sha256", None) if lfs else None) or getattr(sibling, "blob_id", None)
    return blob if isinstance(blob, str) and BLOB_RE.fullmatch(blob) else ""


def disk_check(path: Path, needed: int, margin: int) -> None:
    """HubError(422, disk_full) when a download of `needed` bytes would not leave `margin`."""
    room_check(path, needed, margin, what="the download", error=HubError)


class _ByteCounter:
    """Counts bytes of the file in flight across the progress bars huggingface_hub opens for it."""

    def __init__(self, on_bytes: Callable[[int], None], should_cancel: Callable[[], bool]):
        self.on_bytes = on_bytes
        self.should_cancel = should_cancel
        self.current = 0
        self.lock = threading.Lock()
        self.polled_at = 0.0
        self.polled_bytes = 0

    def bar_class(self) -> type[tqdm]:
        counter = self

        class _Bar(tqdm):
            def __init__(self, *args, **kwargs):
                kwargs["disable"] = True  # we report progress ourselves; keep worker logs clean
                super().__init__(*args, **kwargs)
                self._done = int(kwargs.get("initial") or 0)

            def update(self, n=1):
                self._done += int(n or 0)
                counter.seen(self._done)
                return None

        return _Bar

    def seen(self, done: int) -> None:
        now = time.monotonic()
        if now - self.polled_at >= CANCEL_POLL_SECONDS or done - self.polled_bytes >= (
            CANCEL_POLL_BYTES
        ):
            self.polled_at, self.polled_bytes = now, done
            if self.should_cancel():
                raise DownloadCancelled()
        with self.lock:
            if done > self.current:
                self.current = done
                self.on_bytes(done)


def files_fetch(
    listing: Listing,
    *,
    token: str | None,
    endpoint: str,
    on_bytes: Callable[[int], None],
    should_cancel: Callable[[], bool],
    cache_dir: Path | None = None,
    local_dir: Path | None = None,
) -> list[Path]:
    """Fetch the listing's files in order (into the HF cache, or `local_dir`), pinned to its
    commit; return their local paths.

    `on_bytes(total_done)` gets the running byte count over all files (monotonic);
    `should_cancel()` is polled between files and, while bytes flow, every CANCEL_POLL_SECONDS
    or CANCEL_POLL_BYTES (raises DownloadCancelled).
    Hub failures become HubError (see hub_error); a full disk says so.
    """
    repo_id, repo_type = listing.repo_id, listing.repo_type
    done_before, paths = 0, []
    for f in listing.files:
        if should_cancel():
            raise DownloadCancelled()
        counter = _ByteCounter(
            lambda n, base=done_before, cap=f.size: on_bytes(base + min(n, cap)), should_cancel
        )
        try:
            path = hf_hub_download(
                repo_id,
                f.name,
                repo_type=repo_type,
                revision=listing.commit_sha,
                token=token or False,
                endpoint=endpoint,
                cache_dir=cache_dir,
                local_dir=local_dir,
                tqdm_class=counter.bar_class(),
            )
        except DownloadCancelled:
            raise
        except Exception as exc:  # noqa: BLE001 - every Hub failure is mapped to a message
            raise hub_error(
                exc, repo_id, endpoint, has_token=bool(token), repo_type=repo_type
            ) from None
        done_before += f.size
        on_bytes(done_before)
        paths.append(Path(path))
    return paths


def file_fetch(repo_id: str, name: str, *, revision: str, token: str | None, endpoint: str,
               cache_dir: Path) -> Path:  # fmt: skip
    """One small file into the HF cache (a config), without progress; HubError on failure."""
    try:
        path = hf_hub_download(
            repo_id, name, revision=revision, token=token or False, endpoint=endpoint,
            cache_dir=cache_dir,
        )  # fmt: skip
    except Exception as exc:  # noqa: BLE001
        raise hub_error(exc, repo_id, endpoint, has_token=bool(token)) from None
    return Path(path)
