"""The Hugging Face Hub client every app uses: id checks, one error mapping, listings, downloads.

No Django here: callers pass endpoint, token and folders explicitly (tests point everything at a
loopback fake hub). Every Hub failure becomes a `HubError` whose message tells a researcher what
to do, worded for the kind of repo (model or dataset).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx2
from huggingface_hub import HfApi
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

from mistudio.errors import Invalid, is_disk_full, room_check
from mistudio.transfer import (
    TransferCancelled,
    TransferError,
    Wanted,
    cache_fetch,
    local_fetch,
)

# owner/name, each part ASCII letters, digits, '.', '_' or '-', not starting with '.' or '-'.
REPO_ID_RE = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9._-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
REVISION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,199}$")
REPO_ID_MAX = 96
BLOB_RE = re.compile(r"^(?:[0-9a-f]{40}|[0-9a-f]{64})$")
COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
# A file name the Hub lists: relative '/'-separated parts of printable characters, none empty,
# '.' or '..', no backslash or colon (Windows drive/stream tricks), at most 255 bytes a part.
FILE_PART_RE = re.compile(r"^[^\x00-\x1f\x7f/\\:]{1,255}$")
FILE_NAME_MAX = 1024
LISTING_FILES_MAX = 100_000
STALL_S_DEFAULT = 60.0
SMALL_FILE_MAX = 16 * 1024 * 1024  # a config, an index: larger is not one
API_RETRIES = 3  # transient network errors on API calls are retried before the user sees them


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


def _transient(exc: Exception) -> bool:
    """A network hiccup worth one more try (a dropped or refused connection, a 502/503/504)."""
    if isinstance(exc, httpx2.TransportError) and not isinstance(exc, httpx2.ProxyError):
        return True
    response = getattr(exc, "response", None)
    return isinstance(exc, HfHubHTTPError) and getattr(response, "status_code", None) in (
        502, 503, 504,
    )  # fmt: skip


def _with_retries(call: Callable[[], object]) -> object:
    """`call()`, retried on transient network errors (API_RETRIES attempts in all)."""
    for attempt in range(API_RETRIES):
        try:
            return call()
        except Exception as exc:  # noqa: BLE001 - re-raised unless transient
            if attempt == API_RETRIES - 1 or not _transient(exc):
                raise
            time.sleep(0.2 * 2**attempt)
    raise AssertionError("unreachable")


def repo_listing(repo_id: str, *, repo_type: str, revision: str, token: str | None,
                 endpoint: str) -> Listing:  # fmt: skip
    """The repo's files with sizes at `revision` (one Hub call, no file content).

    Everything the answer gives that later becomes a path, a revision or a database field is
    validated here (listing_check); a listing that fails is refused (HubError 502, bad_listing)
    before any file is fetched."""
    hub = api(endpoint)
    try:
        # the repo's info is public even when its files are gated: ask whether we may read them
        _with_retries(lambda: hub.auth_check(repo_id, repo_type=repo_type, token=token or False))
        info = _with_retries(lambda: hub.repo_info(
            repo_id, repo_type=repo_type, revision=revision, files_metadata=True,
            token=token or False,
        ))  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - every Hub failure is mapped to a message
        raise hub_error(
            exc, repo_id, endpoint, has_token=bool(token), repo_type=repo_type
        ) from None
    siblings = list(info.siblings or [])
    if len(siblings) > LISTING_FILES_MAX:
        raise _bad_listing(repo_id, f"it lists {len(siblings):,} files")
    files = [RepoFile(s.rfilename, s.size, _blob_id(s)) for s in siblings]
    gated = bool(getattr(info, "gated", False))
    return listing_check(Listing(repo_id, info.sha, files, gated, repo_type))


def _bad_listing(repo_id: str, why: str) -> HubError:
    return HubError(
        f"The Hub's answer for {repo_id} is not valid ({why}); nothing was downloaded."
        " Check HF_ENDPOINT if it points to a mirror.",
        code="bad_listing",
        status=502,
    )


def file_name_ok(name: object) -> bool:
    """A repo file name we may turn into a path: relative, '/'-separated, no empty, '.' or '..'
    part, no backslash, colon or control character."""
    if not isinstance(name, str) or not name or len(name.encode()) > FILE_NAME_MAX:
        return False
    parts = name.split("/")
    return all(FILE_PART_RE.fullmatch(p) and p not in (".", "..") for p in parts)


def listing_check(listing: Listing) -> Listing:
    """`listing` unchanged when its commit is 40 hex, every file name is file_name_ok, names
    are unique, every size is a non-negative int and every file has a hex blob id; HubError
    (bad_listing) naming the first bad value otherwise."""
    repo_id = listing.repo_id
    if not isinstance(listing.commit_sha, str) or not COMMIT_RE.fullmatch(listing.commit_sha):
        raise _bad_listing(repo_id, f"the commit {str(listing.commit_sha)[:60]!r} is not a sha")
    seen: set[str] = set()
    for f in listing.files:
        if not file_name_ok(f.name) or f.name in seen:
            raise _bad_listing(repo_id, f"the file name {str(f.name)[:80]!r} is not allowed")
        seen.add(f.name)
        if type(f.size) is not int or f.size < 0:
            raise _bad_listing(repo_id, f"{f.name} has no valid size")
        if not BLOB_RE.fullmatch(f.blob):
            raise _bad_listing(repo_id, f"{f.name} has no checksum")
    return listing


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


def _wanted(listing: Listing, f: RepoFile) -> Wanted:
    return Wanted(listing.repo_id, listing.repo_type, listing.commit_sha, f.name, f.size, f.blob)


def _transfer_error(exc: TransferError) -> HubError:
    return HubError(exc.message, code=exc.code, status=exc.status)


def files_fetch(
    listing: Listing,
    *,
    token: str | None,
    endpoint: str,
    on_bytes: Callable[[int], None],
    should_cancel: Callable[[], bool],
    cache_dir: Path | None = None,
    local_dir: Path | None = None,
    stall_s: float = STALL_S_DEFAULT,
) -> list[Path]:
    """Fetch the listing's files in order (into the HF cache at `cache_dir`, or `local_dir`),
    pinned to its commit; return their local paths.

    `on_bytes(total_done)` gets the running byte count over all files (monotonic);
    `should_cancel()` is polled on every chunk and between files (raises DownloadCancelled).
    No new byte for `stall_s` seconds, a file longer than listed or one that does not match its
    listed checksum ends the download with a HubError naming the file (its partial bytes
    removed); Hub failures become HubError (see hub_error); a full disk says so.
    """
    listing_check(listing)
    done_before, paths = 0, []
    for f in listing.files:
        if should_cancel():
            raise DownloadCancelled()
        transfer = {
            "token": token, "endpoint": endpoint, "stall_s": stall_s,
            "on_bytes": lambda n, base=done_before: on_bytes(base + n),
            "should_cancel": should_cancel,
        }  # fmt: skip
        try:
            if local_dir is not None:
                path = local_fetch(_wanted(listing, f), local_dir=local_dir, **transfer)
            else:
                path = cache_fetch(_wanted(listing, f), cache_dir=cache_dir, **transfer)
        except TransferCancelled:
            raise DownloadCancelled() from None
        except TransferError as exc:
            raise _transfer_error(exc) from None
        except Exception as exc:  # noqa: BLE001 - every Hub failure is mapped to a message
            raise hub_error(
                exc, listing.repo_id, endpoint, has_token=bool(token),
                repo_type=listing.repo_type,
            ) from None  # fmt: skip
        done_before += f.size
        on_bytes(done_before)
        paths.append(path)
    return paths


def file_fetch(listing: Listing, name: str, *, token: str | None, endpoint: str,
               cache_dir: Path, limit: int = SMALL_FILE_MAX,
               stall_s: float = 20.0) -> Path:  # fmt: skip
    """One small listed file (a config, an index) into the HF cache at the listing's commit,
    without progress; HubError when it is not listed, larger than `limit`, or fails."""
    f = next((f for f in listing.files if f.name == name), None)
    if f is None:
        raise HubError(f"{listing.repo_id} has no {name}.", code="no_file", status=404)
    if f.size > limit:
        raise HubError(
            f"{name} of {listing.repo_id} is {f.size:,} bytes; that is not a file we read"
            f" (at most {limit:,}).",
            code="bad_file",
        )
    one = Listing(listing.repo_id, listing.commit_sha, [f], listing.gated, listing.repo_type)
    return files_fetch(
        one, token=token, endpoint=endpoint, cache_dir=cache_dir, on_bytes=lambda n: None,
        should_cancel=lambda: False, stall_s=stall_s,
    )[0]  # fmt: skip
