"""A fake hub that lies: hostile or broken answers for one repo at a time.

    hub.lie("evil/sha", Lie(sha="../../../../outside-the-cache"))
    hub.lie("slow/cdn", Lie(stall_after=512 * 1024, ignore_range=True))

A lie changes what the Hub says about a repo (its listing: commit sha, file names, sizes) or how
its files are served (headers, bodies, stalls, dropped connections, Range ignored). Every other
repo is served truthfully. `FakeHub.truth()` (the `hub` fixture's teardown) ends every lie and
lets stalled bodies go.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field


@dataclass
class Lie:
    sha: str | None = None  # the commit model_info/dataset_info report
    extra_files: list[dict] = field(default_factory=list)  # siblings added to the listing
    names: dict[str, str] = field(default_factory=dict)  # real name → name the listing shows
    sizes: dict[str, object] = field(default_factory=dict)  # real name → size the listing shows
    commit_header: str | None = None  # X-Repo-Commit on /resolve answers
    etag: str | None = None  # ETag and X-Linked-Etag on /resolve and CDN answers
    bodies: dict[str, bytes] = field(default_factory=dict)  # real name → bytes actually served
    stall_after: int | None = None  # each body stops after this many bytes (until truth())
    drop_after: int | None = None  # each body hangs up after this many bytes (a dropped link)
    ignore_range: bool = False  # answer Range requests with the whole body (200)
    released: threading.Event = field(default_factory=threading.Event, repr=False)

    def listing(self, info: dict) -> dict:
        """`info` (a repo info JSON body) as this lie reports it."""
        info = dict(info)
        if self.sha is not None:
            info["sha"] = self.sha
        siblings = []
        for sibling in info.get("siblings", []):
            sibling = dict(sibling)
            real = sibling["rfilename"]
            if real in self.sizes:
                sibling["size"] = self.sizes[real]
                if "lfs" in sibling:
                    sibling["lfs"] = {**sibling["lfs"], "size": self.sizes[real]}
            sibling["rfilename"] = self.names.get(real, real)
            siblings.append(sibling)
        info["siblings"] = siblings + list(self.extra_files)
        return info

    def real_name(self, listed: str) -> str:
        """The repo file a request for the listed name `listed` reads."""
        return next((real for real, shown in self.names.items() if shown == listed), listed)

    def headers(self, headers: dict[str, str]) -> dict[str, str]:
        headers = dict(headers)
        if self.commit_header is not None:
            headers["X-Repo-Commit"] = self.commit_header
        if self.etag is not None:
            headers["ETag"] = f'"{self.etag}"'
            if "X-Linked-Etag" in headers:
                headers["X-Linked-Etag"] = f'"{self.etag}"'
        return headers

    def hold(self, stopped: threading.Event) -> None:
        """Block a stalled body until truth() or the hub stops."""
        while not (self.released.wait(0.2) or stopped.is_set()):
            pass
