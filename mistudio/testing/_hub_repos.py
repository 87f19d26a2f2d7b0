"""The fake hub's data: repos, commits and files, and the JSON the Hub API returns for them.

Files ending in a weights suffix (or over 10 MiB) are stored "in LFS" like on the real Hub: their
listing carries an `lfs` block (sha256, size, pointer size) and their git oid is the pointer's.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

LFS_SUFFIXES = (".safetensors", ".bin", ".onnx", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".model")
LFS_MIN_SIZE = 10 * 1024 * 1024
TIMESTAMP = "2025-01-01T00:00:00.000Z"


def git_blob_oid(data: bytes) -> str:
    """Return the git object id (sha1 of "blob <len>\\0" + data) as 40 hex characters."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(frozen=True)
class HubFile:
    path: str
    data: bytes = field(repr=False)
    sha256: str
    is_lfs: bool
    pointer_size: int
    oid: str  # git oid of the blob, or of the LFS pointer for LFS files

    @classmethod
    def from_bytes(cls, path: str, data: bytes) -> HubFile:
        sha256 = hashlib.sha256(data).hexdigest()
        is_lfs = path.endswith(LFS_SUFFIXES) or len(data) >= LFS_MIN_SIZE
        pointer = (
            f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {len(data)}\n"
        ).encode()
        oid = git_blob_oid(pointer if is_lfs else data)
        return cls(path, data, sha256, is_lfs, len(pointer), oid)

    @property
    def size(self) -> int:
        return len(self.data)

    def tree_entry(self) -> dict:
        """The file as `/api/models/<repo>/tree/<rev>` lists it (real sizes, not pointer sizes)."""
        entry: dict = {"type": "file", "oid": self.oid, "size": self.size, "path": self.path}
        if self.is_lfs:
            entry["lfs"] = {"oid": self.sha256, "size": self.size, "pointerSize": self.pointer_size}
        return entry

    def sibling(self, *, blobs: bool) -> dict:
        """The file as `model_info` lists it; sizes and oids only when `blobs` (files_metadata)."""
        if not blobs:
            return {"rfilename": self.path}
        entry: dict = {"rfilename": self.path, "size": self.size, "blobId": self.oid}
        if self.is_lfs:
            entry["lfs"] = {
                "size": self.size,
                "sha256": self.sha256,
                "pointerSize": self.pointer_size,
            }
        return entry


@dataclass
class HubRepo:
    repo_id: str
    gated: bool = False
    private: bool = False
    commits: dict[str, dict[str, HubFile]] = field(default_factory=dict)
    main: str = ""

    def commit(self, files: dict[str, bytes]) -> str:
        """Add a commit holding exactly `files` and point main at it; returns its 40-hex sha."""
        hub_files = {path: HubFile.from_bytes(path, data) for path, data in sorted(files.items())}
        listing = "".join(f"{f.oid} {f.path}\n" for f in hub_files.values())
        sha = hashlib.sha1(f"{self.repo_id}\n{len(self.commits)}\n{listing}".encode()).hexdigest()
        self.commits[sha] = hub_files
        self.main = sha
        return sha

    def resolve(self, revision: str) -> str | None:
        """Return the commit sha a branch name or sha points to, or None if there is none."""
        if revision == "main":
            return self.main
        return revision if revision in self.commits else None


def read_files(folder_or_files: Path | dict[str, bytes]) -> dict[str, bytes]:
    """Return repo path → bytes for a folder (recursively, hidden files included) or a dict."""
    if isinstance(folder_or_files, dict):
        return {str(PurePosixPath(p)): bytes(b) for p, b in folder_or_files.items()}
    root = Path(folder_or_files)
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def tree_listing(files: dict[str, HubFile], path: str, *, recursive: bool) -> list[dict] | None:
    """Entries under `path` ("" for the root) as the tree API returns them; None if no such dir."""
    prefix = f"{path.strip('/')}/" if path.strip("/") else ""
    entries: dict[str, dict] = {}
    for f in files.values():
        if not f.path.startswith(prefix):
            continue
        parts = f.path[len(prefix) :].split("/")
        depth = len(parts) if recursive else 1
        for i in range(1, min(depth, len(parts) - 1) + 1):
            folder = prefix + "/".join(parts[:i])
            entries.setdefault(folder, _folder_entry(folder))
        if recursive or len(parts) == 1:
            entries[f.path] = f.tree_entry()
    if prefix and not entries:
        return None
    return [entries[k] for k in sorted(entries)]


def _folder_entry(path: str) -> dict:
    return {
        "type": "directory",
        "oid": hashlib.sha1(path.encode()).hexdigest(),
        "size": 0,
        "path": path,
    }


def repo_info_common(repo: HubRepo, sha: str, *, blobs: bool, kind: str) -> dict:
    """The fields the Hub's model and dataset info bodies share, for commit `sha`."""
    files = repo.commits[sha]
    salt = b"" if kind == "model" else f"{kind}:".encode()
    return {
        "_id": hashlib.sha1(salt + repo.repo_id.encode()).hexdigest()[:24],
        "id": repo.repo_id,
        "author": repo.repo_id.split("/")[0] if "/" in repo.repo_id else None,
        "sha": sha,
        "lastModified": TIMESTAMP,
        "createdAt": TIMESTAMP,
        "private": repo.private,
        "gated": "manual" if repo.gated else False,
        "disabled": False,
        "downloads": 0,
        "likes": 0,
        "siblings": [f.sibling(blobs=blobs) for f in files.values()],
        "usedStorage": sum(f.size for f in files.values()),
    }


def model_info(repo: HubRepo, sha: str, *, blobs: bool) -> dict:
    """The JSON body of `/api/models/<repo>[/revision/<rev>]` for commit `sha`."""
    files = repo.commits[sha]
    config = _json_or_empty(files.get("config.json"))
    info = {
        **repo_info_common(repo, sha, blobs=blobs, kind="model"),
        "modelId": repo.repo_id,
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": _tags(files, config),
        "config": {k: config[k] for k in ("architectures", "model_type") if k in config},
    }
    parameters = _safetensors_parameters(files)
    if parameters:
        info["safetensors"] = {"parameters": parameters, "total": sum(parameters.values())}
    return info


def _tags(files: dict[str, HubFile], config: dict) -> list[str]:
    tags = ["transformers"]
    if any(p.endswith(".safetensors") for p in files):
        tags.append("safetensors")
    if config.get("model_type"):
        tags.append(config["model_type"])
    return [*tags, "text-generation"]


def _json_or_empty(f: HubFile | None) -> dict:
    try:
        data = json.loads(f.data) if f is not None else {}
    except (ValueError, RecursionError):  # a hostile config.json of a test repo
        return {}
    return data if isinstance(data, dict) else {}


def _safetensors_parameters(files: dict[str, HubFile]) -> dict[str, int]:
    """Parameter count per dtype over every .safetensors file, read from their headers."""
    counts: dict[str, int] = {}
    for f in files.values():
        if not f.path.endswith(".safetensors") or f.size < 8:
            continue
        try:  # a test repo's hostile header is not counted (the real Hub skips it too)
            (header_len,) = struct.unpack("<Q", f.data[:8])
            header = json.loads(f.data[8 : 8 + min(header_len, f.size)])
            for name, tensor in header.items():
                if name == "__metadata__":
                    continue
                numel = 1
                for dim in tensor["shape"]:
                    numel *= dim
                counts[tensor["dtype"]] = counts.get(tensor["dtype"], 0) + numel
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
            continue
    return counts
