"""Dataset repos for the fake hub: `/api/datasets/<repo>/...` and `/datasets/<repo>/resolve/...`.

Dataset repos live in their own namespace (`FakeHub.dataset_repos`), as on the real Hub where
`tiny/wiki` the model and `tiny/wiki` the dataset are different repos. Everything else (gating,
private repos, bad tokens, revisions, LFS redirects, throttling) behaves as for models.

    hub.add_dataset("tiny/wiki", {"data/train-00000-of-00001.parquet": parquet_bytes})
    HfApi(endpoint=hub.endpoint).dataset_info("tiny/wiki", files_metadata=True)
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote

from mistudio.testing._hub_http import INVALID_CREDENTIALS, HubHandler, _parse_resolve
from mistudio.testing._hub_repos import HubRepo, read_files, repo_info_common


class DatasetRepos:
    """Mixed into FakeHub: publishing dataset repos."""

    dataset_repos: dict[str, HubRepo]

    def add_dataset(
        self,
        repo_id: str,
        folder_or_files: Path | dict[str, bytes],
        *,
        gated: bool = False,
        private: bool = False,
    ) -> str:
        """Publish files as a new commit of the dataset repo `repo_id`; returns its 40-hex sha."""
        files = read_files(folder_or_files)
        with self._lock:  # type: ignore[attr-defined]
            repo = self.dataset_repos.get(repo_id) or HubRepo(repo_id)
            repo.gated, repo.private = gated, private
            sha = repo.commit(files)
            lfs = {f.sha256: f for f in repo.commits[sha].values() if f.is_lfs}
            self._blobs.update(lfs)  # type: ignore[attr-defined]
            self._blob_repos.update({k: repo_id for k in lfs})  # type: ignore[attr-defined]
            self.dataset_repos[repo_id] = repo
        return sha


def dataset_info(repo: HubRepo, sha: str, *, blobs: bool) -> dict:
    """The JSON body of `/api/datasets/<repo>[/revision/<rev>]` for commit `sha`."""
    return {**repo_info_common(repo, sha, blobs=blobs, kind="dataset"), "tags": []}


class HubWithDatasetsHandler(HubHandler):
    """The Hub handler plus dataset routes; model routes are unchanged."""

    dataset_route = False

    def route(self, path: str) -> None:
        self.dataset_route = path.startswith(("/api/datasets/", "/datasets/"))
        if not self.dataset_route:
            super().route(path)
        elif self.token is not None and self.token not in self.hub.tokens:
            self.send_hub_error(401, INVALID_CREDENTIALS)
        elif path.startswith("/api/datasets/"):
            self._api_models([unquote(p) for p in path[len("/api/datasets/") :].split("/")])
        elif (resolve := _parse_resolve(path[len("/datasets") :])) is not None:
            self._resolve(*resolve)
        else:
            self.send_hub_error(404, "Sorry, we can't find the page you are looking for.")

    def _repos(self) -> dict[str, HubRepo]:
        return self.hub.dataset_repos if self.dataset_route else self.hub.repos

    def _info(self, repo: HubRepo, revision: str) -> None:
        if not self.dataset_route:
            super()._info(repo, revision)
            return
        sha = self._commit_or_error(repo, revision)
        if sha is not None:
            blobs = self.query.get("blobs", ["false"])[0].lower() == "true"
            info = dataset_info(repo, sha, blobs=blobs)
            lie = self.hub.lie_for(repo.repo_id)
            self.send_json(lie.listing(info) if lie else info)
