"""The fake hub takes uploads as huggingface_hub sends them to the real Hub (create_repo, then
create_commit with LFS and regular files), checks the token, and serves the files back."""

from __future__ import annotations

import hashlib
import io
import os

import httpx
import pytest
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, hf_hub_download
from huggingface_hub.errors import HfHubHTTPError

from mistudio.testing.fakehub import UNAPPROVED_TOKEN, VALID_TOKEN


def read_back(hub, repo_id, name, tmp_path, token=VALID_TOKEN) -> bytes:
    path = hf_hub_download(repo_id, name, repo_type="dataset", endpoint=hub.endpoint,
                           token=token, cache_dir=tmp_path / os.urandom(4).hex())  # fmt: skip
    with open(path, "rb") as f:
        return f.read()


def test_files_committed_come_back_byte_for_byte(fake_hub, tmp_path):
    api = HfApi(endpoint=fake_hub.endpoint, token=VALID_TOKEN)
    url = api.create_repo("tester/up", repo_type="dataset", private=True)
    assert url == f"{fake_hub.endpoint}/datasets/tester/up" and url.repo_type == "dataset"
    shard, text = os.urandom(200_000), b'{"hooks": []}'
    ops = [
        CommitOperationAdd("shards/a/000000.safetensors", io.BufferedReader(io.BytesIO(shard))),
        CommitOperationAdd("manifest.json", text),
        CommitOperationAdd("README.md", b"---\nlicense: other\n---\n# card\n"),
    ]
    info = api.create_commit("tester/up", ops, repo_type="dataset", commit_message="push")
    repo = fake_hub.dataset_repos["tester/up"]
    assert info.oid == repo.main and repo.private
    assert repo.commits[repo.main]["shards/a/000000.safetensors"].is_lfs  # went through LFS
    assert read_back(fake_hub, "tester/up", "shards/a/000000.safetensors", tmp_path) == shard
    assert read_back(fake_hub, "tester/up", "manifest.json", tmp_path) == text
    with pytest.raises(HfHubHTTPError) as refused:  # private
        read_back(fake_hub, "tester/up", "manifest.json", tmp_path, token=False)
    assert refused.value.response.status_code == 401
    api.create_commit("tester/up", [CommitOperationDelete("manifest.json")], repo_type="dataset",
                      commit_message="rm")  # fmt: skip
    assert set(repo.commits[repo.main]) == {".gitattributes", "README.md",
                                            "shards/a/000000.safetensors"}  # fmt: skip
    with pytest.raises(HfHubHTTPError) as exists:
        api.create_repo("tester/up", repo_type="dataset")
    assert exists.value.response.status_code == 409
    assert api.create_repo("tester/up", repo_type="dataset", exist_ok=True).repo_id == "tester/up"


@pytest.mark.parametrize(
    ("token", "repo_id", "status"),
    [
        ("hf_nosuchtoken0000000000", "tester/x", 401),
        (False, "tester/x", 401),
        (UNAPPROVED_TOKEN, "tester/x", 403),  # valid but read-only
        (VALID_TOKEN, "someone-else/x", 403),  # not the token's namespace
    ],
)
def test_writes_need_a_writing_token(fake_hub, token, repo_id, status):
    with pytest.raises(HfHubHTTPError) as refused:
        HfApi(endpoint=fake_hub.endpoint, token=token).create_repo(repo_id, repo_type="dataset")
    assert refused.value.response.status_code == status
    assert repo_id not in fake_hub.dataset_repos


def test_a_commit_to_a_repo_with_a_read_only_token_is_refused(fake_hub):
    HfApi(endpoint=fake_hub.endpoint, token=VALID_TOKEN).create_repo(
        "tester/ro", repo_type="dataset", exist_ok=True
    )
    before = fake_hub.dataset_repos["tester/ro"].main
    with pytest.raises(HfHubHTTPError) as refused:
        HfApi(endpoint=fake_hub.endpoint, token=UNAPPROVED_TOKEN).create_commit(
            "tester/ro", [CommitOperationAdd("a.txt", b"a")], repo_type="dataset",
            commit_message="x",
        )  # fmt: skip
    assert refused.value.response.status_code == 403
    assert fake_hub.dataset_repos["tester/ro"].main == before


def test_an_upload_url_needs_its_ticket_and_the_right_bytes(fake_hub):
    oid = "0" * 64
    r = httpx.put(f"{fake_hub.endpoint}/lfs-upload/{oid}?ticket=guess", content=b"x")
    assert r.status_code == 403 and ("tester/t", oid) not in fake_hub.uploaded
    fake_hub.tickets["t"] = ("tester/t", oid)
    r = httpx.put(f"{fake_hub.endpoint}/lfs-upload/{oid}?ticket=t", content=b"not those bytes")
    assert r.status_code == 400 and ("tester/t", oid) not in fake_hub.uploaded


def test_the_fake_hub_answers_each_lfs_object_once(fake_hub):
    fake_hub.dataset_create("tester/batch", private=True)
    oid = hashlib.sha256(b"x").hexdigest()
    r = httpx.post(
        f"{fake_hub.endpoint}/datasets/tester/batch.git/info/lfs/objects/batch",
        json={"operation": "upload", "objects": [{"oid": oid, "size": 1}] * 3},
        headers={"Authorization": f"Bearer {VALID_TOKEN}"},
    )
    assert r.status_code == 200 and [o["oid"] for o in r.json()["objects"]] == [oid]
