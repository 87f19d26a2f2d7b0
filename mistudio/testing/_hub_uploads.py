"""Uploads to the fake hub's dataset repos, as huggingface_hub 2.4's `create_repo` and
`create_commit` / `upload_folder` speak to the real Hub (with file objects, i.e. the LFS path):

    POST /api/repos/create                                {name, organization, type, visibility}
    POST /api/validate-yaml                               a README's YAML header
    POST /api/datasets/<repo>/preupload/<rev>             upload mode of each file (lfs / regular)
    POST /datasets/<repo>.git/info/lfs/objects/batch      where to PUT each LFS object (each
                                                          oid once, as the Hub: lfs_batch_repeats)
    PUT  /lfs-upload/<sha256>?ticket=…                    the object (a presigned URL: no token)
    POST /api/datasets/<repo>/commit/<rev>                ndjson: header, file, lfsFile, deleted…

Writing needs a token in `hub.write_tokens` (401 without a valid token, 403 for a read-only
token or a namespace the token may not write to). Pushed files are then served by the normal
download routes, so `hf_hub_download(repo_type="dataset")` reads them back.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import secrets
import threading
from typing import Any
from urllib.parse import unquote

import yaml

from mistudio.testing._hub_datasets import HubWithDatasetsHandler
from mistudio.testing._hub_http import INVALID_CREDENTIALS
from mistudio.testing._hub_repos import LFS_MIN_SIZE, LFS_SUFFIXES, HubRepo

WRITE_NAMESPACES = frozenset({"tester", "mistudio-tests"})  # the VALID_TOKEN user and its org
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"


class Uploads:
    """Mixed into FakeHub: LFS objects received and not committed yet, and committing."""

    write_tokens: set[str]
    write_namespaces: set[str]

    def _uploads_init(self) -> None:
        # LFS objects are kept per repo, as the Hub's batch API answers per repo
        self.uploaded: dict[tuple[str, str], bytes] = {}  # (repo id, sha256) → bytes PUT
        self.tickets: dict[str, tuple[str, str]] = {}  # upload URL's ticket → (repo id, sha256)
        self._upload_lock = threading.Lock()
        self._uploads_open = threading.Event()
        self._uploads_open.set()
        self._upload_held = threading.Event()
        # True: the LFS batch answers an object asked for twice twice (a git-lfs server that
        # does not de-duplicate), so a client uploads it twice, concurrently
        self.lfs_batch_repeats = False

    def hold_uploads(self) -> None:
        """Hold every LFS upload once its bytes are in, before answering (a push mid-upload)."""
        self._upload_held.clear()
        self._uploads_open.clear()

    def release_uploads(self) -> None:
        self._uploads_open.set()

    def wait_until_upload_held(self, timeout: float) -> bool:
        """Block until an upload is held by hold_uploads() (True) or `timeout` s pass (False)."""
        return self._upload_held.wait(timeout)

    def dataset_create(self, repo_id: str, *, private: bool) -> HubRepo:
        """A new dataset repo with the real Hub's first commit (a .gitattributes)."""
        repo = HubRepo(repo_id, private=private)
        repo.commit({".gitattributes": GITATTRIBUTES})
        self.dataset_repos[repo_id] = repo  # type: ignore[attr-defined]
        return repo

    def dataset_commit(self, repo_id: str, files: dict[str, bytes]) -> str:
        """A commit holding exactly `files` on `main` of an existing dataset repo (privacy kept)."""
        repo = self.dataset_repos[repo_id]  # type: ignore[attr-defined]
        return self.add_dataset(repo_id, files, gated=repo.gated, private=repo.private)  # type: ignore[attr-defined]


def upload_mode(path: str, size: int) -> str:
    """ "lfs" or "regular", as the fake hub stores the file (see _hub_repos)."""
    return "lfs" if path.endswith(LFS_SUFFIXES) or size >= LFS_MIN_SIZE else "regular"


class HubWithUploadsHandler(HubWithDatasetsHandler):
    """The Hub handler (models, datasets) plus the upload routes of the module docstring."""

    def route(self, path: str) -> None:
        if self.token is not None and self.token not in self.hub.tokens:
            self.send_hub_error(401, INVALID_CREDENTIALS)
        elif path == "/api/repos/create" and self.method == "POST":
            self._write(self._repo_create)
        elif path == "/api/validate-yaml" and self.method == "POST":
            self._validate_yaml()
        elif path.startswith("/lfs-upload/") and self.method == "PUT":
            self._lfs_put(path.removeprefix("/lfs-upload/"))
        elif path.startswith("/datasets/") and path.endswith(".git/info/lfs/objects/batch"):
            repo_id = unquote(path[len("/datasets/") : -len(".git/info/lfs/objects/batch")])
            self._write(lambda body: self._lfs_batch(repo_id, body))
        elif (found := _dataset_action(path)) is not None and self.method == "POST":
            repo_id, action, revision = found
            handler = self._preupload if action == "preupload" else self._commit
            self._write(lambda body: handler(repo_id, revision, body))
        else:
            super().route(path)

    # -- auth -----------------------------------------------------------------------------------

    def _write(self, handler: Any) -> None:
        """Run `handler(parsed body)` when this token may write, else answer 401 / 403 / 400."""
        if self.token is None:
            self.send_hub_error(401, INVALID_CREDENTIALS)
            return
        if self.token not in self.hub.write_tokens:
            message = "You don't have the rights to write with this token (read-only)."
            self.send_hub_error(403, message)
            return
        ndjson = "ndjson" in (self.headers.get("Content-Type") or "")
        try:
            body = self.body if ndjson else json.loads(self.body)
        except ValueError:
            self.send_hub_error(400, "The request body is not JSON.")
            return
        handler(body)

    def _may_write(self, repo_id: str) -> bool:
        namespace = repo_id.split("/")[0] if "/" in repo_id else "tester"
        if namespace in self.hub.write_namespaces:
            return True
        message = f"You don't have the rights to create a dataset under the namespace {namespace!r}"
        self.send_hub_error(403, message)
        return False

    def _writable_repo(self, repo_id: str) -> HubRepo | None:
        repo = self.hub.dataset_repos.get(repo_id)
        if repo is None:
            self.send_hub_error(404, "Repository not found", "RepoNotFound")
            return None
        return repo if self._may_write(repo_id) else None

    # -- routes ---------------------------------------------------------------------------------

    def _repo_create(self, body: dict) -> None:
        name, org = body.get("name"), body.get("organization")
        if body.get("type") != "dataset" or not isinstance(name, str):
            self.send_hub_error(400, "The fake hub creates dataset repos only.")
            return
        repo_id = f"{org}/{name}" if org else f"tester/{name}"
        if not self._may_write(repo_id):
            return
        url = f"{self.hub.endpoint}/datasets/{repo_id}"
        if repo_id in self.hub.dataset_repos:
            self.send_json({"error": "You already created this dataset repo", "url": url}, 409)
            return
        private = body.get("visibility") == "private" or body.get("private") is True
        self.hub.dataset_create(repo_id, private=private)
        self.send_json({"url": url, "name": repo_id, "id": repo_id})

    def _validate_yaml(self) -> None:
        try:
            content = json.loads(self.body).get("content", "")
            header = content.split("---\n")[1] if content.startswith("---\n") else ""
            metadata = yaml.safe_load(header) if header else {}
            if metadata is not None and not isinstance(metadata, dict):
                raise ValueError("the YAML header is not a mapping")
        except (ValueError, AttributeError, IndexError, yaml.YAMLError) as exc:
            self.send_json({"errors": [{"message": str(exc)}], "warnings": []}, 400)
            return
        self.send_json({"errors": [], "warnings": []})

    def _preupload(self, repo_id: str, revision: str, body: dict) -> None:
        repo = self._writable_repo(repo_id)
        if repo is None or self._commit_or_error(repo, revision) is None:
            return
        files = body.get("files", [])
        self.send_json(
            {
                "files": [
                    {"path": f["path"], "uploadMode": upload_mode(f["path"], int(f["size"])),
                     "shouldIgnore": False, "oid": None}
                    for f in files
                ],
                "commitOid": repo.main,
            }
        )  # fmt: skip

    def _lfs_batch(self, repo_id: str, body: dict) -> None:
        repo = self._writable_repo(repo_id)
        if repo is None:
            return
        objects, seen = [], set()
        for obj in body.get("objects", []):
            oid, size = str(obj.get("oid")), int(obj.get("size", 0))
            if oid in seen and not self.hub.lfs_batch_repeats:
                continue  # the real Hub answers each object once, however often it is asked
            seen.add(oid)
            entry: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            if _repo_object(self.hub, repo, oid) is None:  # else "already present upstream"
                ticket = secrets.token_hex(8)
                with self.hub._upload_lock:
                    self.hub.tickets[ticket] = (repo_id, oid)
                href = f"{self.hub.endpoint}/lfs-upload/{oid}?ticket={ticket}"
                entry["actions"] = {"upload": {"href": href, "header": {}}}
            objects.append(entry)
        data = json.dumps({"transfer": "basic", "objects": objects}).encode()
        self.send_bytes(data, 200, {"Content-Type": "application/vnd.git-lfs+json"})

    def _lfs_put(self, oid: str) -> None:
        ticket = self.query.get("ticket", [""])[0]
        repo_id, wanted = self.hub.tickets.get(ticket, ("", ""))
        if wanted != oid:
            self.send_bytes(b"<Error>AccessDenied</Error>", 403, {"Content-Type": "text/xml"})
            return
        if hashlib.sha256(self.body).hexdigest() != oid:
            self.send_bytes(b"<Error>BadDigest</Error>", 400, {"Content-Type": "text/xml"})
            return
        with self.hub._upload_lock:
            self.hub.uploaded[(repo_id, oid)] = self.body
            self.hub.tickets.pop(ticket, None)
        if not self.hub._uploads_open.is_set():
            self.hub._upload_held.set()
            self.hub._uploads_open.wait(timeout=600)
        self.send_bytes(b"", 200, {"ETag": f'"{oid}"'})

    def _commit(self, repo_id: str, revision: str, body: bytes) -> None:
        repo = self._writable_repo(repo_id)
        if repo is None or (sha := self._commit_or_error(repo, revision)) is None:
            return
        if not isinstance(body, bytes):
            self.send_hub_error(400, "A commit is sent as application/x-ndjson.")
            return
        files = {path: f.data for path, f in repo.commits[sha].items()}
        try:
            for line in body.splitlines():
                if line.strip():
                    self._commit_line(json.loads(line), files, repo)
        except (ValueError, KeyError, TypeError, binascii.Error) as exc:
            self.send_hub_error(400, f"Invalid commit payload: {exc}")
            return
        new_sha = self.hub.dataset_commit(repo_id, files)
        url = f"{self.hub.endpoint}/datasets/{repo_id}/commit/{new_sha}"
        self.send_json(
            {"success": True, "commitOid": new_sha, "commitUrl": url, "pullRequestUrl": None}
        )

    def _commit_line(self, item: dict, files: dict[str, bytes], repo: HubRepo) -> None:
        """Apply one ndjson line of a commit to `files` (path → bytes)."""
        key, value = item["key"], item["value"]
        if key == "file":
            files[value["path"]] = base64.b64decode(value["content"], validate=True)
        elif key == "lfsFile":
            oid = value["oid"]
            data = _repo_object(self.hub, repo, oid)
            if data is None:
                raise KeyError(f"LFS object {oid} was never uploaded")
            files[value["path"]] = data
        elif key == "deletedFile":
            files.pop(value["path"], None)
        elif key == "deletedFolder":
            prefix = value["path"].rstrip("/") + "/"
            for path in [p for p in files if p.startswith(prefix)]:
                del files[path]
        elif key != "header":
            raise ValueError(f"unknown key {key!r}")


def _repo_object(hub: Any, repo: HubRepo, oid: str) -> bytes | None:
    """The LFS object `oid` as repo `repo` has it (uploaded, or in one of its commits)."""
    data = hub.uploaded.get((repo.repo_id, oid))
    if data is not None:
        return data
    for files in repo.commits.values():
        for f in files.values():
            if f.is_lfs and f.sha256 == oid:
                return f.data
    return None


def _dataset_action(path: str) -> tuple[str, str, str] | None:
    """("owner/name", "preupload" | "commit", revision) of /api/datasets/<repo>/<action>/<rev>."""
    parts = path.removeprefix("/api/datasets/").split("/")
    if not path.startswith("/api/datasets/") or len(parts) != 4:
        return None
    if parts[2] not in ("preupload", "commit"):
        return None
    return unquote(f"{parts[0]}/{parts[1]}"), parts[2], unquote(parts[3])
