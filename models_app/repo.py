"""Model repos on the Hub: which files a model needs, the preflight before any byte, the download
into the shared HF cache, and clean-up of what an interrupted download left.

No Django here: callers pass endpoint, token and cache dir explicitly (see mistudio.hub).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

from huggingface_hub import scan_cache_dir
from huggingface_hub.errors import CacheNotFound

from mistudio.hub import (
    BLOB_RE,
    REPO_ID_RE,
    HubError,
    Listing,
    RepoFile,
    file_fetch,
    files_fetch,
    repo_listing,
)
from mistudio.jsonparse import JSONRefused, json_loads

# Besides its weights, what a model needs to load: config, generation defaults, tokenizer.
SUPPORT_FILES = frozenset({
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
})  # fmt: skip
# The weight layouts transformers loads, in the order it looks for them: one file or an index
# naming the shards. Pickles (can run code when loaded) only when an admin allows them.
SAFETENSORS = ("model.safetensors", "model.safetensors.index.json")
PICKLES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
INDEX_MAX_BYTES = 16 * 1024 * 1024  # a 10k-shard index is ~1 MB; more is not an index


def _index_shards(index: object, index_name: str) -> set[str]:
    """The shard file names an index's weight_map names (HubError when it is not an index)."""
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    shards = set(weight_map.values()) if isinstance(weight_map, dict) else set()
    if not shards or not all(isinstance(s, str) and _is_plain_name(s) for s in shards):
        raise HubError(f"{index_name} is not a valid weight index.", code="bad_index")
    return shards


def _is_plain_name(name: str) -> bool:
    parts = name.split("/")
    return bool(name) and not name.startswith("/") and "\\" not in name and ".." not in parts


def _weights(files: dict[str, RepoFile], layout: tuple[str, str], index: object) -> list[RepoFile]:
    """The files of one layout: the single file, or the index and exactly the shards it names."""
    single, index_name = layout
    if index_name in files:
        shards = _index_shards(index, index_name)
        missing = sorted(shards - files.keys())
        if missing:
            raise HubError(
                f"{index_name} names {len(missing)} file(s) the repo does not have"
                f" ({', '.join(missing[:3])}).",
                code="bad_index",
            )
        return [files[index_name], *(files[n] for n in sorted(shards))]
    return [files[single]] if single in files else []


def files_select(
    files: list[RepoFile], *, allow_pickle: bool, index: object = None
) -> list[RepoFile]:
    """The files transformers needs to load the model: config, tokenizer, and ONE copy of the
    weights — `model.safetensors`, or the index and exactly the shards it names (`index`, the
    parsed index when the repo has one); other weight files (consolidated.safetensors, ONNX,
    adapters, original/…) are left. HubError when there is no config, no loadable weights, or
    only pickles and they are not allowed."""
    by_name = {f.name: f for f in files}
    if "config.json" not in by_name:
        raise HubError(
            "This repo has no config.json; it is not a transformers model.", code="no_config"
        )
    weights = _weights(by_name, SAFETENSORS, index)
    if not weights and _weights(by_name, PICKLES, index if allow_pickle else None):
        if not allow_pickle:
            raise HubError(
                "This repo only has pickle weights (.bin), which can run code when loaded;"
                " miStudio loads safetensors only. Use a safetensors version of the model.",
                code="pickle_only",
            )
        weights = _weights(by_name, PICKLES, index)
    if not weights:
        raise HubError(_no_weights_message(files), code="no_weights")
    return [by_name[n] for n in sorted(SUPPORT_FILES & by_name.keys())] + weights


def _no_weights_message(files: list[RepoFile]) -> str:
    others = sorted(f.name for f in files if f.name.endswith((".safetensors", ".bin", ".pt")))
    if not others:
        return "This repo has no model weights (no .safetensors files)."
    return (
        "This repo has no model.safetensors or model.safetensors.index.json, the weights"
        f" transformers loads (it has {', '.join(others[:3])}: another tool's layout)."
    )


def _index_name(files: list[RepoFile], allow_pickle: bool) -> str | None:
    names = {f.name for f in files}
    for candidate in (SAFETENSORS[1], PICKLES[1] if allow_pickle else None):
        if candidate in names:
            return candidate
    return None


@dataclass(frozen=True)
class Preflight(Listing):
    """The files to fetch, and those of them the HF cache held before we fetched anything (they
    are someone else's: never ours to delete)."""

    cached_before: frozenset[str] = frozenset()

    def files_json(self, fetched: frozenset[str] = frozenset()) -> list[dict]:
        """[{name, size, blob, owned}]: `owned` True for the files in `fetched` (we fetched them
        now), None for those not fetched yet (decided when the download fetches them)."""
        return [
            {"name": f.name, "size": f.size, "blob": f.blob,
             "owned": True if f.name in fetched else None}
            for f in self.files
        ]  # fmt: skip


def repo_preflight(
    repo_id: str,
    *,
    revision: str,
    token: str | None,
    endpoint: str,
    cache_dir: Path,
    allow_pickle: bool = False,
) -> Listing:
    """Check access and list exactly the files to fetch with their sizes, before any weight byte
    is downloaded (a sharded repo's index, a few KB, is fetched to read the shard names)."""
    listing = repo_listing(
        repo_id, repo_type="model", revision=revision, token=token, endpoint=endpoint
    )
    before = cached_names(cache_dir, repo_id, listing.commit_sha, [f.name for f in listing.files])
    index = None
    if name := _index_name(listing.files, allow_pickle):
        index = _json_file(listing, name, token, endpoint, cache_dir, INDEX_MAX_BYTES)
    selected = files_select(listing.files, allow_pickle=allow_pickle, index=index)
    return Preflight(**{**vars(listing), "files": selected}, cached_before=before)


def _json_file(
    listing: Listing, name: str, token: str | None, endpoint: str, cache_dir: Path, limit: int
) -> object:
    path = file_fetch(
        listing, name, token=token, endpoint=endpoint, cache_dir=cache_dir, limit=limit
    )
    try:
        return json_loads(path.read_bytes()[: limit + 1])
    except (OSError, ValueError):
        raise HubError(f"{name} is not valid JSON.", code="bad_file") from None


CONFIG_MAX_BYTES = 4 * 1024 * 1024  # a config.json is a few KB


def config_fetch(
    repo_id: str,
    *,
    revision: str,
    token: str | None,
    endpoint: str,
    cache_dir: Path,
    listing: Listing | None = None,
) -> dict:
    """Download config.json alone (a few KB, at most CONFIG_MAX_BYTES) at the commit `listing`
    pins (listed first when not given) and return it parsed. HubError when the repo has no
    config.json or it is not a JSON object."""
    if listing is None:
        listing = repo_listing(
            repo_id, repo_type="model", revision=revision, token=token, endpoint=endpoint
        )
    path = file_fetch(
        listing, "config.json", token=token, endpoint=endpoint, cache_dir=cache_dir,
        limit=CONFIG_MAX_BYTES,
    )  # fmt: skip
    try:
        config = json_loads(path.read_bytes()[: CONFIG_MAX_BYTES + 1])
    except JSONRefused as exc:
        raise HubError(f"config.json is refused: {exc}.", code="bad_config") from None
    except (OSError, ValueError):
        raise HubError("config.json is not valid JSON.", code="bad_config") from None
    if not isinstance(config, dict):
        raise HubError("config.json is not a JSON object.", code="bad_config")
    return config


def files_download(preflight: Preflight, **fetch) -> Path:
    """Fetch a model's preflight files into the HF cache (`cache_dir`), smallest first; return
    the snapshot folder. `fetch`: mistudio.hub.files_fetch's keywords (progress, cancel)."""
    smallest_first = replace(preflight, files=sorted(preflight.files, key=lambda f: f.size))
    return files_fetch(smallest_first, **fetch)[-1].parent


@dataclass(frozen=True)
class CachedSnapshot:
    """A complete model snapshot found in the local HF cache (another tool's download, maybe)."""

    repo_id: str
    commit: str
    path: Path  # the snapshot folder transformers loads from
    files: list[RepoFile]  # the files a load needs, as files_select picks them
    size_bytes: int


def cached_snapshots(cache_dir: Path) -> list[CachedSnapshot]:
    """Every model snapshot in the HF cache at `cache_dir` that holds what a load needs (config,
    tokenizer, one complete copy of the weights); newest first. Reads the disk only."""
    try:
        info = scan_cache_dir(cache_dir)
    except (CacheNotFound, OSError, ValueError):
        return []
    found = []
    for repo in info.repos:
        if repo.repo_type != "model" or not REPO_ID_RE.fullmatch(repo.repo_id):
            continue
        for revision in sorted(repo.revisions, key=lambda r: r.last_modified, reverse=True):
            snapshot = _complete_snapshot(repo.repo_id, revision)
            if snapshot is not None:
                found.append(snapshot)
    return found


def _complete_snapshot(repo_id: str, revision) -> CachedSnapshot | None:
    path = Path(revision.snapshot_path)
    files = [
        RepoFile(p.relative_to(path).as_posix(), p.stat().st_size)
        for p in path.rglob("*")
        if p.is_file()
    ]
    index = None
    if name := _index_name(files, allow_pickle=False):
        try:
            index = json_loads((path / name).read_bytes()[: INDEX_MAX_BYTES + 1])
        except (OSError, ValueError):
            return None
    try:
        selected = files_select(files, allow_pickle=False, index=index)
    except HubError:
        return None
    size = sum(f.size for f in selected)
    return CachedSnapshot(repo_id, revision.commit_hash, path, selected, size)


def repo_cache_dir(cache_dir: Path, repo_id: str) -> Path:
    """The HF cache folder of a model repo (models--owner--name)."""
    return Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))


def cached_names(cache_dir: Path, repo_id: str, commit: str, names: list[str]) -> frozenset[str]:
    """Which of `names` the HF cache already holds at `commit` (whoever fetched them)."""
    snapshot = repo_cache_dir(cache_dir, repo_id) / "snapshots" / commit
    return frozenset(n for n in names if (snapshot / n).exists())


def snapshot_files_remove(cache_dir: Path, repo_id: str, commit: str, names: list[str]) -> int:
    """Delete our files from the HF cache: the snapshot entries `names` at `commit`, each blob
    no other snapshot entry still links, their lock files, then folders left empty (the repo
    folder only when nothing else is in it). Another tool's files are never touched: callers
    pass only the files we fetched. Returns how many entries were removed."""
    root = repo_cache_dir(cache_dir, repo_id)
    snapshot = root / "snapshots" / commit
    blobs = {_blob_of(snapshot / n) for n in names} - {None}
    removed = 0
    for name in names:
        entry = snapshot / name
        if entry.is_symlink() or entry.is_file():
            entry.unlink()
            removed += 1
    still_linked = {_blob_of(p) for p in root.glob("snapshots/*/**/*") if p.is_symlink()}
    for blob in blobs - still_linked:
        (root / "blobs" / blob).unlink(missing_ok=True)
        (Path(cache_dir) / ".locks" / root.name / f"{blob}.lock").unlink(missing_ok=True)
    _prune_empty(root, Path(cache_dir) / ".locks" / root.name)
    return removed


def _blob_of(entry: Path) -> str | None:
    """The blob name a snapshot symlink points to (None for a plain file or a missing one)."""
    if not entry.is_symlink():
        return None
    target = Path(os.readlink(entry))
    return target.name if target.parent.name == "blobs" else None


def _prune_empty(root: Path, locks: Path) -> None:
    """Remove empty folders under the repo folder; the refs and the repo folder itself only
    when no snapshot and no blob is left in it."""
    for folder in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        with contextlib.suppress(OSError):
            folder.rmdir()  # only succeeds when empty
    if not any(root.glob("snapshots/*")) and not any(root.glob("blobs/*")):
        shutil.rmtree(root / "refs", ignore_errors=True)
        for folder in (root, locks):
            with contextlib.suppress(OSError):
                folder.rmdir()


def partial_files_remove(cache_dir: Path, repo_id: str, blobs: list[str]) -> int:
    """Delete the unfinished blobs (`<blob>.incomplete`) and lock files of OUR interrupted
    download: `blobs` are the blob ids of the files we were fetching. Another tool's download in
    progress keeps its own. Returns how many files were removed."""
    root = repo_cache_dir(cache_dir, repo_id)
    removed = 0
    for blob in (b for b in blobs if BLOB_RE.fullmatch(b)):
        # huggingface_hub writes `<blob>.incomplete` or `<blob>.<random>.incomplete`
        unfinished = [
            *root.glob(f"blobs/{blob}.incomplete"),
            *root.glob(f"blobs/{blob}.*.incomplete"),
        ]
        for path in [*unfinished, Path(cache_dir) / ".locks" / root.name / f"{blob}.lock"]:
            if path.exists():
                path.unlink(missing_ok=True)
                removed += 1
    _prune_empty(root, Path(cache_dir) / ".locks" / root.name)
    return removed
