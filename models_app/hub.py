"""Hugging Face Hub access: repo-id validation, preflight, filtered byte-accurate downloads.

No Django here: callers pass endpoint, token and cache dir explicitly (so tests point everything at
a loopback fake hub). Every Hub failure becomes a `HubError` with a message a researcher can act on.
"""

from __future__ import annotations

import errno
import fnmatch
import json
import re
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
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

# owner/name, each part ASCII letters, digits, '.', '_' or '-', not starting with '.' or '-'.
REPO_ID_RE = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9._-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
REVISION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,199}$")
REPO_ID_MAX = 96

# What a model needs to load: weights as safetensors, config, tokenizer. Top-level files only.
WANTED_PATTERNS = (
    "*.safetensors",
    "*.safetensors.index.json",
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")

# huggingface_hub streams in 10 MiB chunks and reports progress once per chunk; 1 MiB gives
# byte-accurate progress and a cancel that takes effect within a megabyte. Read at call time.
constants.DOWNLOAD_CHUNK_SIZE = 1024 * 1024


class HubError(Exception):
    """A Hub problem with a user-facing message and the HTTP status our API answers with."""

    def __init__(self, message: str, *, code: str, status: int = 422):
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status


class DownloadCancelled(Exception):
    """Raised from inside the byte stream when the job was cancelled."""


@dataclass(frozen=True)
class RepoFile:
    name: str
    size: int


@dataclass
class Preflight:
    repo_id: str
    commit_sha: str
    files: list[RepoFile]
    gated: bool = False
    ignored: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


def repo_id_clean(raw: object) -> str:
    """Return the repo id stripped of surrounding spaces, or raise HubError(status=422)."""
    if not isinstance(raw, str) or not raw.strip():
        raise HubError("Enter a Hugging Face repo id such as owner/model-name.", code="invalid")
    repo_id = raw.strip()
    if "://" in repo_id or repo_id.startswith(("www.", "huggingface.co", "hf.co")):
        raise HubError("Paste the repo id (owner/model-name), not a URL.", code="invalid")
    if len(repo_id) > REPO_ID_MAX:
        raise HubError(f"A repo id has at most {REPO_ID_MAX} characters.", code="invalid")
    if not repo_id.isascii() or not REPO_ID_RE.fullmatch(repo_id) or ".." in repo_id:
        raise HubError(
            "A repo id is owner/model-name using letters, digits, '.', '_' and '-' only.",
            code="invalid",
        )
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise HubError(f"Invalid repo id: {exc}", code="invalid") from None
    return repo_id


def revision_clean(raw: object) -> str:
    if raw is None or raw == "":
        return "main"
    if not isinstance(raw, str) or not REVISION_RE.fullmatch(raw) or ".." in raw:
        raise HubError("A revision is a branch, tag or commit sha.", code="invalid")
    return raw


def _map_hub_error(exc: Exception, repo_id: str, endpoint: str, has_token: bool) -> HubError:
    page = f"{endpoint}/{repo_id}"
    if isinstance(exc, GatedRepoError):
        hint = "" if has_token else " and paste an access token"
        return HubError(
            f"{repo_id} is gated: accept the licence at {page}{hint}, then try again.",
            code="gated",
            status=403,
        )
    if isinstance(exc, RepositoryNotFoundError):
        return HubError(
            f"{repo_id} was not found on the Hub, or it is private (a private repo needs a token"
            " with access).",
            code="not_found",
            status=404,
        )
    if isinstance(exc, RevisionNotFoundError):
        return HubError(f"{repo_id} has no such revision.", code="no_revision", status=404)
    if isinstance(exc, EntryNotFoundError):
        return HubError(f"{repo_id} has no such file.", code="no_file", status=404)
    if isinstance(exc, HfHubHTTPError):
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
    return HubError(
        f"Could not reach the Hub at {endpoint}: {type(exc).__name__}.",
        code="unreachable",
        status=502,
    )


def _api(endpoint: str) -> HfApi:
    return HfApi(endpoint=endpoint, library_name="mistudio")


def _is_wanted(name: str) -> bool:
    return "/" not in name and any(fnmatch.fnmatch(name, p) for p in WANTED_PATTERNS)


def _is_pickle(name: str) -> bool:
    return any(fnmatch.fnmatch(name, p) for p in PICKLE_PATTERNS)


def files_select(files: list[RepoFile], *, allow_pickle: bool) -> tuple[list[RepoFile], list[str]]:
    """Return (files to download, names ignored); HubError for pickle-only or weightless repos."""
    wanted = [f for f in files if _is_wanted(f.name)]
    ignored = [f.name for f in files if f not in wanted]
    has_safetensors = any(f.name.endswith(".safetensors") for f in wanted)
    pickles = [f for f in files if "/" not in f.name and _is_pickle(f.name)]
    if not has_safetensors and pickles:
        if not allow_pickle:
            raise HubError(
                "This repo only has pickle weights (.bin/.pt), which can run code when loaded;"
                " miStudio loads safetensors only. Use a safetensors version of the model.",
                code="pickle_only",
            )
        wanted += pickles
    elif not has_safetensors:
        raise HubError("This repo has no model weights (no .safetensors files).", code="no_weights")
    if not any(f.name == "config.json" for f in wanted):
        raise HubError(
            "This repo has no config.json; it is not a transformers model.", code="no_config"
        )
    return wanted, ignored


def repo_preflight(
    repo_id: str, *, revision: str, token: str | None, endpoint: str, allow_pickle: bool = False
) -> Preflight:
    """Check access and list the files to fetch with their sizes, before any byte is downloaded."""
    try:
        info = _api(endpoint).model_info(
            repo_id, revision=revision, files_metadata=True, token=token or False
        )
    except Exception as exc:  # noqa: BLE001 - every Hub failure is mapped to a message
        raise _map_hub_error(exc, repo_id, endpoint, bool(token)) from None
    files = [RepoFile(s.rfilename, int(s.size or 0)) for s in (info.siblings or [])]
    wanted, ignored = files_select(files, allow_pickle=allow_pickle)
    return Preflight(
        repo_id=repo_id,
        commit_sha=info.sha or revision,
        files=wanted,
        gated=bool(getattr(info, "gated", False)),
        ignored=ignored,
    )


def config_fetch(
    repo_id: str, *, revision: str, token: str | None, endpoint: str, cache_dir: Path
) -> dict:
    """Download config.json alone (a few KB) and return it parsed."""
    try:
        path = hf_hub_download(
            repo_id,
            "config.json",
            revision=revision,
            token=token or False,
            endpoint=endpoint,
            cache_dir=cache_dir,
        )
    except Exception as exc:  # noqa: BLE001
        raise _map_hub_error(exc, repo_id, endpoint, bool(token)) from None
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        raise HubError("config.json is not valid JSON.", code="bad_config") from None


def disk_free(path: Path) -> int:
    path.mkdir(parents=True, exist_ok=True)
    return shutil.disk_usage(path).free


def disk_check(path: Path, needed: int, margin: int) -> None:
    free = disk_free(path)
    if needed + margin > free:
        raise HubError(
            f"Not enough disk space in {path}: the download needs {needed / 1e9:.2f} GB plus a"
            f" {margin / 1e9:.2f} GB margin and {free / 1e9:.2f} GB are free.",
            code="disk_full",
            status=422,
        )


class _ByteCounter:
    """Counts bytes of the file in flight across the progress bars huggingface_hub opens for it."""

    def __init__(self, on_bytes: Callable[[int], None], should_cancel: Callable[[], bool]):
        self.on_bytes = on_bytes
        self.should_cancel = should_cancel
        self.current = 0
        self.lock = threading.Lock()

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
        if self.should_cancel():
            raise DownloadCancelled()
        with self.lock:
            if done > self.current:
                self.current = done
                self.on_bytes(done)


ErrorMapper = Callable[[Exception, str, str, bool], HubError]


def files_fetch(
    repo_id: str,
    files: list[RepoFile],
    *,
    revision: str,
    token: str | None,
    endpoint: str,
    on_bytes: Callable[[int], None],
    should_cancel: Callable[[], bool],
    repo_type: str = "model",
    cache_dir: Path | None = None,
    local_dir: Path | None = None,
    map_error: ErrorMapper | None = None,
) -> list[Path]:
    """Fetch `files` one by one (into the HF cache, or `local_dir`); return their local paths.

    `on_bytes(total_done)` gets the running byte count over all files (monotonic);
    `should_cancel()` is polled on every chunk and between files (raises DownloadCancelled).
    Hub failures become HubError through `map_error`; a full disk says so.
    """
    map_error = map_error or _map_hub_error
    done_before, paths = 0, []
    for f in files:
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
                revision=revision,
                token=token or False,
                endpoint=endpoint,
                cache_dir=cache_dir,
                local_dir=local_dir,
                tqdm_class=counter.bar_class(),
            )
        except DownloadCancelled:
            raise
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EFBIG):
                raise HubError(
                    "The disk filled up during the download.", code="disk_full"
                ) from None
            raise map_error(exc, repo_id, endpoint, bool(token)) from None
        except Exception as exc:  # noqa: BLE001 - every Hub failure is mapped to a message
            raise map_error(exc, repo_id, endpoint, bool(token)) from None
        done_before += f.size
        on_bytes(done_before)
        paths.append(Path(path))
    return paths


def files_download(
    preflight: Preflight,
    *,
    token: str | None,
    endpoint: str,
    cache_dir: Path,
    on_bytes: Callable[[int], None],
    should_cancel: Callable[[], bool],
) -> Path:
    """Fetch a model's preflight files into the HF cache, smallest first; return the snapshot
    folder (see files_fetch for progress and cancel)."""
    paths = files_fetch(
        preflight.repo_id,
        sorted(preflight.files, key=lambda f: f.size),
        revision=preflight.commit_sha,
        token=token,
        endpoint=endpoint,
        cache_dir=cache_dir,
        on_bytes=on_bytes,
        should_cancel=should_cancel,
    )
    return paths[-1].parent


def repo_cache_dir(cache_dir: Path, repo_id: str) -> Path:
    """The HF cache folder of a model repo (models--owner--name)."""
    return cache_dir / ("models--" + repo_id.replace("/", "--"))


def partial_files_remove(cache_dir: Path, repo_id: str) -> int:
    """Delete `*.incomplete` blobs and lock files left by an interrupted download; return count."""
    root = repo_cache_dir(cache_dir, repo_id)
    removed = 0
    for pattern in ("blobs/*.incomplete", "**/*.lock"):
        for p in root.glob(pattern):
            p.unlink(missing_ok=True)
            removed += 1
    locks = cache_dir / ".locks" / root.name
    if locks.exists():
        shutil.rmtree(locks, ignore_errors=True)
    return removed
