"""Model repos on the Hub: which files a model needs, the preflight before any byte, the download
into the shared HF cache, and clean-up of what an interrupted download left.

No Django here: callers pass endpoint, token and cache dir explicitly (see mistudio.hub).
"""

from __future__ import annotations

import fnmatch
import json
import shutil
from dataclasses import replace
from pathlib import Path

from mistudio.hub import HubError, Listing, RepoFile, file_fetch, files_fetch, repo_listing

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


def _is_wanted(name: str) -> bool:
    return "/" not in name and any(fnmatch.fnmatch(name, p) for p in WANTED_PATTERNS)


def _is_pickle(name: str) -> bool:
    return any(fnmatch.fnmatch(name, p) for p in PICKLE_PATTERNS)


def files_select(files: list[RepoFile], *, allow_pickle: bool) -> list[RepoFile]:
    """The files a model needs; HubError for pickle-only or weightless repos."""
    wanted = [f for f in files if _is_wanted(f.name)]
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
    return wanted


def repo_preflight(
    repo_id: str, *, revision: str, token: str | None, endpoint: str, allow_pickle: bool = False
) -> Listing:
    """Check access and list the files to fetch with their sizes, before any byte is downloaded."""
    listing = repo_listing(
        repo_id, repo_type="model", revision=revision, token=token, endpoint=endpoint
    )
    return replace(listing, files=files_select(listing.files, allow_pickle=allow_pickle))


def config_fetch(
    repo_id: str, *, revision: str, token: str | None, endpoint: str, cache_dir: Path
) -> dict:
    """Download config.json alone (a few KB) and return it parsed."""
    path = file_fetch(
        repo_id, "config.json", revision=revision, token=token, endpoint=endpoint,
        cache_dir=cache_dir,
    )  # fmt: skip
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        raise HubError("config.json is not valid JSON.", code="bad_config") from None


def files_download(preflight: Listing, **fetch) -> Path:
    """Fetch a model's preflight files into the HF cache (`cache_dir`), smallest first; return
    the snapshot folder. `fetch`: mistudio.hub.files_fetch's keywords (progress, cancel)."""
    smallest_first = replace(preflight, files=sorted(preflight.files, key=lambda f: f.size))
    return files_fetch(smallest_first, **fetch)[-1].parent


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
