"""A loopback fake of the Hugging Face Hub that unmodified huggingface_hub 2.4 talks to.

    with FakeHub() as hub:
        hub.add_catalogue()
        HfApi(endpoint=hub.endpoint).model_info("tiny/llama", files_metadata=True)
        with hub.activate():  # for code that takes no endpoint= (transformers' from_pretrained)
            AutoConfig.from_pretrained("tiny/llama", cache_dir=tmp_path)

Two servers on 127.0.0.1 with OS-chosen ports: the Hub API (`endpoint`) and a "CDN" (another
origin) that LFS redirects point to. Gated, private and missing repos, bad tokens, unknown
revisions and files answer like the real Hub, so huggingface_hub raises its own errors. Dataset
repos accept `create_repo` and `create_commit` / `upload_folder` from a writing token
(`VALID_TOKEN`, namespaces "tester" and "mistudio-tests"; see _hub_uploads).

Run `python -m mistudio.testing.fakehub --port 8765` to serve the tiny catalogue by hand.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from pathlib import Path
from types import TracebackType

from mistudio.testing._hub_datasets import DatasetRepos
from mistudio.testing._hub_http import CdnHandler, Valve
from mistudio.testing._hub_lies import Lie
from mistudio.testing._hub_repos import HubFile, HubRepo, read_files
from mistudio.testing._hub_uploads import WRITE_NAMESPACES, HubWithUploadsHandler, Uploads
from mistudio.testing.hub_shapes import SHAPES, build_shape
from mistudio.testing.tiny_models import build_catalogue

VALID_TOKEN = "hf_validtoken1234567890"  # valid and approved for gated and private repos
UNAPPROVED_TOKEN = "hf_unapprovedtoken1234567890"  # valid, but not approved for gated repos
GATED_REPOS = frozenset({"tiny/gated-llama"})


@dataclass(frozen=True)
class HubRequest:
    """One request either server received; `token_used` is kept out of repr so it never prints."""

    server: str  # "hub" or "cdn"
    method: str
    path: str
    had_authorization: bool
    token_used: str | None = field(default=None, repr=False)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], handler: type) -> None:
        super().__init__(address, handler)
        self.connections: set[socket.socket] = set()

    def process_request_thread(self, request: socket.socket, client_address: object) -> None:
        self.connections.add(request)
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.connections.discard(request)

    def close_connections(self) -> None:
        """Hang up on idle keep-alive clients so their handler threads end with the server."""
        for connection in list(self.connections):
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)


class FakeHub(DatasetRepos, Uploads):
    """The fake Hub: start on construction, `stop()` (or leave the `with` block) to shut down."""

    def __init__(self, root: Path | None = None, *, host: str = "127.0.0.1", port: int = 0):
        self.root = root  # where add_catalogue() copies the tiny repos; None: shared build
        self.tokens: set[str] = {VALID_TOKEN, UNAPPROVED_TOKEN}
        self.approved_tokens: set[str] = {VALID_TOKEN}
        self.write_tokens: set[str] = {VALID_TOKEN}  # UNAPPROVED_TOKEN is read-only
        self.write_namespaces: set[str] = set(WRITE_NAMESPACES)
        self._uploads_init()  # see _hub_uploads
        self.repos: dict[str, HubRepo] = {}
        self.dataset_repos: dict[str, HubRepo] = {}  # add_dataset(), see _hub_datasets
        self.requests: list[HubRequest] = []
        self.valve = Valve()
        self._blobs: dict[str, HubFile] = {}
        self._blob_repos: dict[str, str] = {}  # LFS sha256 → repo id (for lies on the CDN)
        self.lies: dict[str, Lie] = {}  # repo id → its lie (see _hub_lies)
        self.stopped_event = threading.Event()
        self._lock = threading.Lock()
        self._stopped = False
        self._hub = self._serve(HubWithUploadsHandler, host, port)
        self._cdn = self._serve(CdnHandler, host, 0)

    def _serve(self, handler: type, host: str, port: int) -> _Server:
        server = _Server((host, port), handler)
        server.hub = self  # type: ignore[attr-defined]
        thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        thread.start()
        return server

    @property
    def endpoint(self) -> str:
        """Base URL of the Hub API, e.g. "http://127.0.0.1:38021" (for endpoint= / HF_ENDPOINT)."""
        host, port = self._hub.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def cdn_endpoint(self) -> str:
        """Base URL of the CDN that LFS files redirect to (a different origin than `endpoint`)."""
        host, port = self._cdn.server_address[:2]
        return f"http://{host}:{port}"

    # -- content ------------------------------------------------------------------------------

    def add_repo(
        self,
        repo_id: str,
        folder_or_files: Path | dict[str, bytes],
        *,
        gated: bool = False,
        private: bool = False,
    ) -> str:
        """Publish a folder (or path → bytes) as a new commit of `repo_id`; returns its 40-hex sha.

        Adding to an existing repo makes a new commit that `main` points to; older shas stay
        resolvable.
        """
        files = read_files(folder_or_files)
        with self._lock:
            repo = self.repos.get(repo_id) or HubRepo(repo_id)
            repo.gated, repo.private = gated, private
            sha = repo.commit(files)
            self._blobs.update({f.sha256: f for f in repo.commits[sha].values() if f.is_lfs})
            self._blob_repos.update({f.sha256: repo_id for f in repo.commits[sha].values()})
            self.repos[repo_id] = repo
        return sha

    def add_catalogue(self) -> dict[str, str]:
        """Publish the tiny catalogue (tiny/gated-llama gated); returns repo_id → commit sha."""
        return {
            repo_id: self.add_repo(repo_id, folder, gated=repo_id in GATED_REPOS)
            for repo_id, folder in build_catalogue(self.root).items()
        }

    def blob(self, sha256: str) -> HubFile | None:
        """The LFS file with this sha256, as the CDN serves it."""
        return self._blobs.get(sha256)

    # -- lies (see _hub_lies) -------------------------------------------------------------------

    def lie(self, repo_id: str, lie: Lie) -> Lie:
        """Serve `repo_id` (model or dataset) with `lie` until truth(); returns it."""
        self.lies[repo_id] = lie
        return lie

    def truth(self) -> None:
        """End every lie and let bodies stalled by one go (they hang up)."""
        for lie in self.lies.values():
            lie.released.set()
        self.lies.clear()

    def lie_for(self, repo_id: str) -> Lie | None:
        return self.lies.get(repo_id)

    def lie_for_blob(self, sha256: str) -> Lie | None:
        return self.lies.get(self._blob_repos.get(sha256, ""))

    # -- transfer control ---------------------------------------------------------------------

    def set_rate(self, bytes_per_second: float | None) -> None:
        """Throttle every file body to a shared link of this many bytes/s (None: full speed)."""
        if bytes_per_second is not None and bytes_per_second <= 0:
            raise ValueError("bytes_per_second must be positive or None")
        self.valve.set(rate=bytes_per_second, _link_free_at=0.0)

    def pause(self, *, after_bytes: int = 64 * 1024) -> None:
        """Hold every file body once it has sent `after_bytes` bytes (smaller files complete)."""
        self.valve.set(paused=True, pause_after=after_bytes)

    def resume(self) -> None:
        """Let held and future file bodies flow again."""
        self.valve.set(paused=False)

    def on_body(self, callback: Callable[[str], None] | None) -> None:
        """Call `callback(path)` in the hub's thread when a file's body is asked for, before the
        answer's first byte (None: no more calls): a test's way to act at an exact point of a
        download (a body of one chunk then arrives with no pause between its headers and end)."""
        self.valve.set(on_body=callback)

    def release_held(self) -> None:
        """Let the bodies held now run to their end; bodies that start later still hold."""
        self.valve.release()

    @property
    def held(self) -> int:
        """How many file bodies are held by `pause()` right now."""
        return self.valve.held

    def wait_until_held(self, count: int = 1, timeout: float = 10.0, *, holds: int = 0) -> bool:
        """Block until `count` bodies are held and `holds` have held in all (True), or `timeout`
        seconds pass (False)."""
        return self.valve.wait_until_held(count, timeout, holds=holds)

    @property
    def bytes_sent(self) -> int:
        """File-body bytes sent so far by the hub and the CDN together."""
        return self.valve.bytes_sent

    # -- bookkeeping ----------------------------------------------------------------------------

    def record(
        self, server: str, method: str, path: str, had_authorization: bool, token: str | None
    ) -> None:
        """Append a HubRequest (called by the handlers for every request they receive)."""
        self.requests.append(HubRequest(server, method, path, had_authorization, token))

    @contextlib.contextmanager
    def activate(self) -> Iterator[FakeHub]:
        """Make this hub the default endpoint (HF_ENDPOINT) inside the block, then restore.

        huggingface_hub copies HF_ENDPOINT into `constants.ENDPOINT` and
        `constants.HUGGINGFACE_CO_URL_TEMPLATE` at import time, so setting the variable later
        changes nothing: both constants are switched too.
        """
        from huggingface_hub import constants

        saved_env = os.environ.get("HF_ENDPOINT")
        saved = (constants.ENDPOINT, constants.HUGGINGFACE_CO_URL_TEMPLATE)
        os.environ["HF_ENDPOINT"] = constants.ENDPOINT = self.endpoint
        constants.HUGGINGFACE_CO_URL_TEMPLATE = (
            f"{self.endpoint}/{{repo_id}}/resolve/{{revision}}/{{filename}}"
        )
        try:
            yield self
        finally:
            constants.ENDPOINT, constants.HUGGINGFACE_CO_URL_TEMPLATE = saved
            if saved_env is None:
                os.environ.pop("HF_ENDPOINT", None)
            else:
                os.environ["HF_ENDPOINT"] = saved_env

    def stop(self) -> None:
        """Abort bodies in flight, stop both servers and free their ports. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        self.stopped_event.set()
        self.truth()
        self.release_uploads()
        self.valve.stop()
        for server in (self._hub, self._cdn):
            server.shutdown()
            server.server_close()
            server.close_connections()

    def __enter__(self) -> FakeHub:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    """Serve the tiny catalogue until Ctrl-C, for manual trials with HF_ENDPOINT."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--rate", type=float, default=None, help="throttle bodies, bytes/s")
    parser.add_argument("--root", type=Path, default=None, help="where to build the repos")
    args = parser.parse_args(argv)
    with FakeHub(args.root, host=args.host, port=args.port) as hub:
        shas = hub.add_catalogue()
        shapes_root = Path(tempfile.mkdtemp(prefix="mistudio-hub-shapes-"))
        for repo_id in SHAPES:  # the real-Hub shapes: MoE, multimodal, sharded, custom code …
            shas[repo_id] = hub.add_repo(repo_id, build_shape(repo_id, shapes_root))
        hub.set_rate(args.rate)
        print(_banner(hub, shas), flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()


def _banner(hub: FakeHub, shas: dict[str, str]) -> str:
    lines = [
        f"Fake Hub serving at {hub.endpoint} (LFS CDN at {hub.cdn_endpoint})",
        f"  export HF_ENDPOINT={hub.endpoint}",
        f"  valid token: {VALID_TOKEN}   valid but not approved: {UNAPPROVED_TOKEN}",
    ]
    for repo_id, sha in shas.items():
        lines.append(f"  {repo_id:<30} {sha}{'  (gated)' if repo_id in GATED_REPOS else ''}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
