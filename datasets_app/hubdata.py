"""Hugging Face dataset repos: access check, the files of one split, byte-accurate downloads.

No Django here: callers pass endpoint, token and folders explicitly (tests point them at the
loopback fake hub). Hub failures are mistudio.hub's HubError, worded for datasets.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mistudio.hub import DownloadCancelled, HubError, Listing, RepoFile, files_fetch, repo_listing

from .formats import HUB_FORMATS, ImportCancelled, format_of

# Names the `datasets` library also accepts for the three usual splits.
SPLIT_NAMES = {
    "train": ("train", "training"),
    "validation": ("validation", "valid", "val", "dev"),
    "test": ("test", "testing", "eval", "evaluation"),
}
# When a split has the same rows in several formats, read the first of these.
FORMAT_PREFERENCE = ("parquet", "jsonl", "csv", "txt")
SPLIT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class DatasetPreflight(Listing):
    """The files of one split (in one format) of a dataset repo."""

    split: str = "train"
    fmt: str = ""


def _split_pattern(names: tuple[str, ...]) -> re.Pattern[str]:
    """A file belongs to a split when a folder is named after it (`train/…`) or its file name
    starts with the name after a separator (`data/train-00000-of-00002.parquet`, `train.jsonl`,
    `c4-train.00000.json.gz`) — the same rule as the `datasets` library's default layouts."""
    alt = "|".join(re.escape(n) for n in names)
    return re.compile(
        rf"(?:^|/)(?:{alt})/|(?:^|/|[-._ 0-9])(?:{alt})(?:[-._ 0-9][^/]*)?$", re.IGNORECASE
    )


def _data_files(files: list[RepoFile]) -> list[tuple[RepoFile, str]]:
    """(file, format) for every readable data file; dot-folders and READMEs are not data, and
    a name that could leave the download folder ('..', absolute) is never fetched."""
    out = []
    for f in files:
        if f.name.startswith("/") or any(p.startswith(".") for p in f.name.split("/")):
            continue
        fmt = format_of(f.name, HUB_FORMATS)
        if fmt and f.name.rsplit("/", 1)[-1].lower() not in ("readme.txt", "requirements.txt"):
            out.append((f, fmt))
    return out


def splits_found(files: list[RepoFile]) -> list[str]:
    """The usual split names that have data files in this listing."""
    data = _data_files(files)
    return [
        s
        for s, names in SPLIT_NAMES.items()
        if any(_split_pattern(names).search(f.name) for f, _ in data)
    ]


def split_files(files: list[RepoFile], split: str, repo_id: str) -> tuple[str, list[RepoFile]]:
    """(format, files) holding `split`, in name order. A repo with no split names holds only
    `train`. Raises HubError(422) when there is no such split or no readable data file."""
    data = _data_files(files)
    if not data:
        raise HubError(
            f"The dataset {repo_id} has no data files miStudio can read (Parquet,"
            " JSON Lines, CSV or text).",
            code="no_data",
        )
    pattern = _split_pattern(SPLIT_NAMES.get(split.lower(), (split,)))
    chosen = [(f, fmt) for f, fmt in data if pattern.search(f.name)]
    if not chosen and split.lower() == "train" and not splits_found(files):
        chosen = data
    if not chosen:
        found = ", ".join(splits_found(files)) or "none recognised"
        raise HubError(
            f"The dataset {repo_id} has no files for the split '{split}' (splits found: {found}).",
            code="no_split",
        )
    fmt = next(p for p in FORMAT_PREFERENCE if any(f == p for _, f in chosen))
    return fmt, sorted((f for f, f_fmt in chosen if f_fmt == fmt), key=lambda f: f.name)


def dataset_preflight(
    repo_id: str, *, split: str, revision: str, token: str | None, endpoint: str
) -> DatasetPreflight:
    """Check access and list the split's files with their sizes, before any byte of data."""
    listing = repo_listing(
        repo_id, repo_type="dataset", revision=revision, token=token, endpoint=endpoint
    )
    fmt, chosen = split_files(listing.files, split, repo_id)
    return DatasetPreflight(**{**vars(listing), "files": chosen}, split=split, fmt=fmt)


def files_download(
    pre: DatasetPreflight,
    *,
    token: str | None,
    endpoint: str,
    local_dir: Path,
    on_bytes: Callable[[int], None],
    should_cancel: Callable[[], bool],
    stall_s: float,
) -> list[Path]:
    """Fetch the split's files into `local_dir` (partial files stay inside it); return their
    paths in the preflight's order. `on_bytes(total so far)` is monotonic over all files;
    `should_cancel()` is polled on every chunk and between files (raises ImportCancelled)."""
    try:
        return files_fetch(
            pre,
            token=token,
            endpoint=endpoint,
            local_dir=local_dir,
            stall_s=stall_s,
            on_bytes=on_bytes,
            should_cancel=should_cancel,
        )
    except DownloadCancelled:
        raise ImportCancelled() from None
