"""HTTP side of the fake hub: request handlers for the Hub API and for the "CDN" serving LFS blobs.

Responses copy the real Hub's (as read by huggingface_hub 2.4): errors carry `X-Error-Code` /
`X-Error-Message` headers and a JSON `{"error": ...}` body; `/resolve` answers small files itself
(ETag = git oid) and redirects LFS files with 302 to another origin (the CDN port) with
`X-Linked-Etag` (sha256) and `X-Linked-Size`, so huggingface_hub drops the token on the way.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from typing import Any, Protocol
from urllib.parse import parse_qs, quote, unquote, urlsplit

from mistudio.testing._hub_lies import Lie
from mistudio.testing._hub_repos import HubFile, HubRepo, model_info, tree_listing


class HubState(Protocol):
    """What the request handlers read of the fake hub (fakehub.FakeHub provides it)."""

    endpoint: str
    cdn_endpoint: str
    repos: dict[str, HubRepo]
    dataset_repos: dict[str, Any]
    tokens: set[str]
    approved_tokens: set[str]
    valve: Any

    def record(self, *args: Any) -> None: ...

    def blob(self, sha256: str) -> HubFile | None: ...

    def lie_for(self, repo_id: str) -> Lie | None: ...

    def lie_for_blob(self, sha256: str) -> Lie | None: ...


INVALID_CREDENTIALS = "Invalid credentials in Authorization header"
_RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")


class StreamStopped(Exception):
    """The hub is stopping: abandon the body being sent."""


class Valve:
    """Shared throttle and pause switch for every file body the hub and CDN send.

    Throttling is one global link of `rate` bytes/s that all streams share. While paused, a body
    holds once it has sent `pause_after` bytes, so a test can stop a download mid-file;
    `release()` lets the bodies held now go on to their end while later ones still hold.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.rate: float | None = None
        self.paused = False
        self.pause_after = 0
        self.held = 0
        self.holds = 0  # bodies that have held so far (each counted once)
        self.releases = 0  # release() calls so far
        self.bytes_sent = 0
        self._stopped = False
        self._link_free_at = 0.0  # time.monotonic() when the throttled link is idle again
        # on_body(path): a file's body was asked for; called before the answer's first byte
        self.on_body: Callable[[str], None] | None = None

    def chunk_size(self, sent: int) -> int:
        """Bytes to send next, given `sent` bytes of this body are out (never past a pause mark)."""
        size = 256 * 1024 if self.rate is None else int(min(max(self.rate / 50, 1024), 64 * 1024))
        if self.paused and sent < self.pause_after:
            size = min(size, self.pause_after - sent)
        return size

    def before_chunk(self, sent: int, released: bool = False) -> bool:
        """Block while paused past this body's pause mark, unless `released`; return whether the
        body was released (its later chunks pass); raise StreamStopped on stop."""
        with self._cond:
            if self.paused and sent >= self.pause_after and not released:
                released = self._hold()
            if self._stopped:
                raise StreamStopped
        return released

    def _hold(self) -> bool:
        self.held += 1
        self.holds += 1
        self._cond.notify_all()
        generation = self.releases
        try:
            self._cond.wait_for(
                lambda: not self.paused or self._stopped or self.releases > generation
            )
        finally:
            self.held -= 1
            self._cond.notify_all()
        return self.paused

    def release(self) -> None:
        """Let the bodies held now run to their end; later bodies still hold while paused."""
        with self._cond:
            self.releases += 1
            self._cond.notify_all()

    def after_chunk(self, n: int) -> None:
        """Count `n` sent bytes and, when throttled, wait for the link's time slot for them."""
        with self._cond:
            self.bytes_sent += n
            if self.rate is None:
                return
            now, rate = time.monotonic(), self.rate
            self._link_free_at = max(now, self._link_free_at) + n / rate
            # A new rate (or none) applies at once, even to a stream waiting for its slot.
            self._cond.wait_for(
                lambda: self._stopped or self.rate != rate, timeout=self._link_free_at - now
            )
            if self._stopped:
                raise StreamStopped

    def set(self, **changes: object) -> None:
        with self._cond:
            for name, value in changes.items():
                setattr(self, name, value)
            self._cond.notify_all()

    def wait_until_held(self, count: int, timeout: float, *, holds: int = 0) -> bool:
        """Wait until `count` bodies hold now and at least `holds` have held in all."""
        with self._cond:
            return self._cond.wait_for(
                lambda: self.held >= count and self.holds >= holds, timeout=timeout
            )

    def stop(self) -> None:
        self.set(_stopped=True)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as huggingface_hub's pooled client expects
    server_kind = "hub"

    @property
    def hub(self) -> HubState:
        return self.server.hub  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: object) -> None:
        pass  # tests read hub.requests instead of stderr

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def _dispatch(self, method: str) -> None:
        self.method = method
        url = urlsplit(self.path)
        self.query = parse_qs(url.query)
        self.body = self._read_body() if method in ("POST", "PUT") else b""
        self.form = self._read_form()
        self.token = self._bearer_token()
        had_authorization = self.headers.get("Authorization") is not None
        self.hub.record(self.server_kind, method, url.path, had_authorization, self.token)
        self.route(url.path)

    def route(self, path: str) -> None:
        raise NotImplementedError

    def _read_body(self) -> bytes:
        """The request body, sent with a Content-Length or chunked (a streamed upload)."""
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            parts = []
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                parts.append(self.rfile.read(size))
                self.rfile.readline()  # the CRLF after each chunk
            while self.rfile.readline().strip():  # trailers, up to the blank line
                pass
            return b"".join(parts)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _read_form(self) -> dict[str, list[str]]:
        """A form-encoded body as parse_qs reads it (JSON, ndjson and binary bodies: empty)."""
        kind = (self.headers.get("Content-Type") or "").lower()
        if not self.body or any(k in kind for k in ("json", "octet-stream")):
            return {}
        return parse_qs(self.body.decode(errors="replace"))

    def _bearer_token(self) -> str | None:
        header = self.headers.get("Authorization") or ""
        scheme, _, token = header.partition(" ")
        return token.strip() if scheme.lower() == "bearer" and token.strip() else None

    # -- responses -----------------------------------------------------------------------------

    def send_json(self, data: object, status: int = 200) -> None:
        self.send_bytes(json.dumps(data).encode(), status, {"Content-Type": "application/json"})

    def send_bytes(self, body: bytes, status: int, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in {**headers, "Content-Length": str(len(body))}.items():
            self.send_header(name, value)
        self.end_headers()
        if self.method != "HEAD":
            self.wfile.write(body)

    def send_hub_error(
        self, status: int, message: str, code: str | None = None, headers: dict | None = None
    ) -> None:
        extra = {"X-Error-Message": message, **({"X-Error-Code": code} if code else {})}
        body = json.dumps({"error": message}).encode()
        self.send_bytes(
            body, status, {"Content-Type": "application/json", **extra, **(headers or {})}
        )

    def send_file_body(self, f: HubFile, headers: dict[str, str], lie: Lie | None = None) -> None:
        """Send `f` (or the byte range asked for) through the hub's throttle/pause valve."""
        start, end = 0, f.size
        status = 200
        range_header = self.headers.get("Range")
        if lie is not None:
            headers = lie.headers(headers)
            range_header = None if lie.ignore_range else range_header
        if range_header:
            parsed = _parse_range(range_header, f.size)
            if parsed is None:
                self.send_hub_error(416, "Requested range not satisfiable")
                return
            start, end = parsed
            status = 206
            headers = {**headers, "Content-Range": f"bytes {start}-{end - 1}/{f.size}"}
        if self.method != "HEAD" and self.hub.valve.on_body is not None:
            self.hub.valve.on_body(f.path)
        self.send_response(status)
        for name, value in {**headers, "Content-Length": str(end - start)}.items():
            self.send_header(name, value)
        self.end_headers()
        if self.method != "HEAD":
            self._stream(f.data, start, end, lie)

    def _stream(self, data: bytes, start: int, end: int, lie: Lie | None = None) -> None:
        valve, sent, released = self.hub.valve, 0, False
        try:
            while start + sent < end:
                released = valve.before_chunk(sent, released)
                n = min(valve.chunk_size(sent), end - start - sent)
                if lie is not None and (n := self._lie_limit(lie, sent, n)) == 0:
                    break
                self.wfile.write(data[start + sent : start + sent + n])
                self.wfile.flush()
                sent += n
                valve.after_chunk(n)
        except (StreamStopped, OSError):
            self.close_connection = True  # the client sees a short body, as on a dropped link

    def _lie_limit(self, lie: Lie, sent: int, n: int) -> int:
        """Bytes to send next under `lie` (0: hang up now); blocks where the body stalls."""
        for mark in (lie.drop_after, lie.stall_after):
            if mark is not None and sent < mark:
                n = min(n, mark - sent)
        if lie.stall_after is not None and sent >= lie.stall_after:
            self.wfile.flush()
            lie.hold(self.hub.stopped_event)
            raise StreamStopped
        if lie.drop_after is not None and sent >= lie.drop_after:
            self.close_connection = True
            return 0
        return n


class HubHandler(_Handler):
    """The Hub: `/api/models/...`, `/api/whoami-v2` and `/<repo>/resolve/<rev>/<path>`."""

    def route(self, path: str) -> None:
        resolve = _parse_resolve(path)
        if self.token is not None and self.token not in self.hub.tokens:
            self.send_hub_error(401, INVALID_CREDENTIALS)
        elif path == "/api/whoami-v2":
            self._whoami()
        elif path == "/api/models":
            self._list_models()
        elif path.startswith("/api/models/"):
            self._api_models([unquote(p) for p in path[len("/api/models/") :].split("/")])
        elif resolve is not None:
            self._resolve(*resolve)
        else:
            self.send_hub_error(404, "Sorry, we can't find the page you are looking for.")

    def _whoami(self) -> None:
        if self.token is None:
            self.send_hub_error(401, INVALID_CREDENTIALS)
            return
        role = "read" if self.token in self.hub.approved_tokens else "fineGrained"
        self.send_json(
            {
                "type": "user",
                "name": "tester",
                "fullname": "Test User",
                "auth": {
                    "type": "access_token",
                    "accessToken": {"displayName": "tests", "role": role},
                },
            }
        )

    def _list_models(self) -> None:
        """`GET /api/models?search=…&filter=…&limit=…` as huggingface_hub's list_models reads it:
        public repos (and private ones the token may see) whose id contains `search` and whose
        tags include every `filter`, the latest commit of each, by id."""
        search = self.query.get("search", [""])[0].lower()
        wanted = set(self.query.get("filter", []))
        limit = int(self.query.get("limit", ["1000"])[0])
        approved = self.token is not None and self.token in self.hub.approved_tokens
        found = []
        for repo_id, repo in sorted(self.hub.repos.items()):
            if (repo.private and not approved) or search not in repo_id.lower():
                continue
            info = model_info(repo, repo.main, blobs=False)
            if wanted <= {*info["tags"], info.get("pipeline_tag")}:
                found.append({k: v for k, v in info.items() if k != "siblings"})
        self.send_json(found[:limit])

    def _api_models(self, parts: list[str]) -> None:
        repo_id, rest = self._split_repo(parts)
        repo = self._repo_or_error(repo_id, files=rest == ["auth-check"])
        if repo is None:
            return
        if rest == [] or (len(rest) == 2 and rest[0] == "revision"):
            self._info(repo, rest[1] if rest else "main")
        elif rest == ["auth-check"]:
            self.send_json({})
        elif rest[0] == "tree" and len(rest) >= 2:
            self._tree(repo, rest[1], "/".join(rest[2:]))
        elif rest[0] == "paths-info" and len(rest) == 2 and self.method == "POST":
            self._paths_info(repo, rest[1])
        else:
            self.send_hub_error(404, "Sorry, we can't find the page you are looking for.")

    def _repos(self) -> dict[str, HubRepo]:
        """The namespace this request's repo ids live in (models here)."""
        return self.hub.repos

    def _split_repo(self, parts: list[str]) -> tuple[str, list[str]]:
        """Split "owner/name/..." or "name/..." path parts into a repo id and the rest."""
        repos = self._repos()
        if len(parts) >= 2 and "/".join(parts[:2]) in repos:
            return "/".join(parts[:2]), parts[2:]
        if parts[0] in repos or len(parts) == 1:
            return parts[0], parts[1:]
        return "/".join(parts[:2]), parts[2:]

    def _repo_or_error(self, repo_id: str, *, files: bool) -> HubRepo | None:
        """Return the repo if this caller may see it (and its files, if `files`), else answer."""
        repo = self._repos().get(repo_id)
        approved = self.token is not None and self.token in self.hub.approved_tokens
        if repo is None or (repo.private and not approved):
            # Like the Hub: 401 to anonymous callers, 404 to signed-in ones; same error code.
            status = 401 if self.token is None else 404
            self.send_hub_error(status, "Repository not found", "RepoNotFound")
            return None
        if files and repo.gated and not approved:
            self._gated_error(repo_id)
            return None
        return repo

    def _gated_error(self, repo_id: str) -> None:
        if self.token is None:
            message = (
                f"Access to model {repo_id} is restricted. You must have access to it and be"
                " authenticated to access it. Please log in."
            )
            self.send_hub_error(401, message, "GatedRepo")
        else:
            message = (
                f"Access to model {repo_id} is restricted and you are not in the authorized list."
                f" Visit {self.hub.endpoint}/{repo_id} to ask for access."
            )
            self.send_hub_error(403, message, "GatedRepo")

    def _commit_or_error(self, repo: HubRepo, revision: str) -> str | None:
        sha = repo.resolve(revision)
        if sha is None:
            self.send_hub_error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return sha

    def _info(self, repo: HubRepo, revision: str) -> None:
        sha = self._commit_or_error(repo, revision)
        if sha is None:
            return
        blobs = self.query.get("blobs", ["false"])[0].lower() == "true"
        info = model_info(repo, sha, blobs=blobs)
        lie = self.hub.lie_for(repo.repo_id)
        if lie and lie.api_drops > 0:
            lie.api_drops -= 1
            self.close_connection = True  # no answer at all: a dropped connection
            return
        self.send_json(lie.listing(info) if lie else info)

    def _tree(self, repo: HubRepo, revision: str, path: str) -> None:
        sha = self._commit_or_error(repo, revision)
        if sha is None:
            return
        recursive = self.query.get("recursive", ["false"])[0].lower() == "true"
        entries = tree_listing(repo.commits[sha], path, recursive=recursive)
        if entries is None:
            self.send_hub_error(404, f"Entry not found: {path}", "EntryNotFound")
        else:
            self.send_json(entries)

    def _paths_info(self, repo: HubRepo, revision: str) -> None:
        sha = self._commit_or_error(repo, revision)
        if sha is None:
            return
        files = repo.commits[sha]
        wanted = self.form.get("paths", [])
        self.send_json([files[p].tree_entry() for p in wanted if p in files])

    def _resolve(self, repo_id: str, revision: str, path: str) -> None:
        repo = self._repo_or_error(repo_id, files=True)
        if repo is None:
            return
        sha = self._commit_or_error(repo, revision)
        if sha is None:
            return
        lie = self.hub.lie_for(repo_id)
        path = lie.real_name(path) if lie else path
        f = repo.commits[sha].get(path)
        if f is None:
            self.send_hub_error(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": sha})
            return
        if lie and path in lie.bodies:
            f = HubFile(path, lie.bodies[path], f.sha256, False, f.pointer_size, f.oid)
        headers = {
            "X-Repo-Commit": sha,
            "Accept-Ranges": "bytes",
            "Content-Disposition": _disposition(path),
        }
        if f.is_lfs:
            self._redirect_to_cdn(f, lie.headers(headers) if lie else headers)
        else:
            content_type = "application/json" if path.endswith(".json") else "text/plain"
            headers = {**headers, "ETag": f'"{f.oid}"', "Content-Type": content_type}
            self.send_file_body(f, headers, lie)

    def _redirect_to_cdn(self, f: HubFile, headers: dict[str, str]) -> None:
        name = quote(f.path.rsplit("/", 1)[-1])
        location = f"{self.hub.cdn_endpoint}/lfs/{f.sha256}?filename={name}"
        linked = {"X-Linked-Etag": f'"{f.sha256}"', "X-Linked-Size": str(f.size)}
        body = f"Found. Redirecting to {location}".encode()
        headers = {**headers, **linked, "ETag": f'"{f.oid}"', "Location": location}
        self.send_bytes(body, 302, {**headers, "Content-Type": "text/plain"})


class CdnHandler(_Handler):
    """Stands in for the CDN an LFS redirect points to: `/lfs/<sha256>`, no auth (signed URL)."""

    server_kind = "cdn"

    def route(self, path: str) -> None:
        sha256 = path.removeprefix("/lfs/")
        f = self.hub.blob(sha256)
        if f is None or self.method == "POST":
            self.send_bytes(b"Not Found", 404, {"Content-Type": "text/plain"})
            return
        name = self.query.get("filename", [f.path.rsplit("/", 1)[-1]])[0]
        headers = {
            "ETag": f'"{f.sha256}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
            "Content-Disposition": _disposition(name),
        }
        self.send_file_body(f, headers, self.hub.lie_for_blob(sha256))


def _parse_resolve(path: str) -> tuple[str, str, str] | None:
    """Split "/<repo>/resolve/<revision>/<file path>" into its three parts (None if not one)."""
    parts = path.strip("/").split("/")
    for at in (2, 1):  # "owner/name" first, then a bare "name"
        if len(parts) > at + 2 and parts[at] == "resolve" and parts[0] != "api":
            repo_id, revision = unquote("/".join(parts[:at])), unquote(parts[at + 1])
            return repo_id, revision, unquote("/".join(parts[at + 2 :]))
    return None


def _disposition(path: str) -> str:
    name = quote(path.rsplit("/", 1)[-1])
    return f"inline; filename*=UTF-8''{name}; filename=\"{name}\";"


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """Parse a single "bytes=a-b" range into [start, end) within `size`; None if unsatisfiable."""
    match = _RANGE_RE.match(header.strip())
    if match is None or match.groups() == ("", ""):
        return None
    first, last = match.groups()
    if first == "":  # suffix range: the last N bytes
        start, end = max(size - int(last), 0), size
    else:
        start, end = int(first), size if last == "" else min(int(last) + 1, size)
    return (start, end) if start < end else None
