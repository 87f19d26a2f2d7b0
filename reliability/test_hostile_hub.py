"""A Hub that lies (a hostile mirror behind HF_ENDPOINT, a broken CDN): every value it gives
that becomes a path, a revision or a row is validated before use, and no transfer outlives its
stall timeout or its listed size. Each lie is served for one cloned repo only (mistudio.testing.
_hub_lies), on the models route and the datasets route alike."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from django.test import Client

from datasets_app import services as dataset_services
from datasets_app import tasks as dataset_tasks
from datasets_app.models import Dataset
from mistudio.hub import HubError
from mistudio.testing._hub_lies import Lie
from models_app import resident, services, tasks
from models_app.ml.filecheck import FileCheckError
from models_app.ml.loading import load_model
from models_app.models import Model, ModelStatus

from .conftest import FIGURES

pytestmark = pytest.mark.django_db(transaction=True)

ESCAPES = [
    "../../../../../../outside-the-cache",
    "../outside",
    "/abs/outside",
    "main",  # a branch name where a commit sha belongs
    "0" * 39,
    "A" * 40,  # not lower-case hex
    "",
]
BAD_NAMES = [
    "../../../../escape.json",
    "sub/../../escape.json",
    "/etc/escape.json",
    "a\\..\\..\\escape.json",
    "C:escape.json",
    "./config.json",
    "bad\x00name.json",
    "dup//name.json",
]


def clone(hub, source: str, repo_id: str, *, dataset: bool = False) -> str:
    repos = hub.dataset_repos if dataset else hub.repos
    repo = repos[source]
    files = {path: f.data for path, f in repo.commits[repo.main].items()}
    if dataset:
        return hub.add_dataset(repo_id, files)
    return hub.add_repo(repo_id, files)


def outside_files(tmp_path: Path, settings) -> list[str]:
    """Files under the test's tmp dir that are neither in the data dir nor in the HF cache."""
    allowed = (Path(settings.DATA_DIR), Path(settings.MODELS_CACHE_DIR))
    found = []
    for root, _, names in os.walk(tmp_path):
        for name in names:
            path = Path(root) / name
            if not any(a == path or a in path.parents for a in allowed):
                found.append(str(path.relative_to(tmp_path)))
    return found


def incomplete(settings) -> list[Path]:
    return [*Path(settings.MODELS_CACHE_DIR).rglob("*.incomplete")] if Path(
        settings.MODELS_CACHE_DIR
    ).exists() else []  # fmt: skip


@pytest.mark.parametrize("sha", ESCAPES)
def test_a_commit_sha_that_is_not_40_hex_is_refused_before_any_file(hub, tmp_path, settings, sha):
    repo_id = clone(hub, "tiny/llama", "lies/sha") and "lies/sha"
    hub.lie(repo_id, Lie(sha=sha))
    with pytest.raises(HubError) as exc:
        services.model_download(hf_repo_id=repo_id, quantization="FP16")
    assert exc.value.code == "bad_listing" and "not a sha" in exc.value.message
    assert not Model.objects.exists()
    assert outside_files(tmp_path, settings) == []
    assert not Path(settings.MODELS_CACHE_DIR).exists() or not any(
        Path(settings.MODELS_CACHE_DIR).rglob("*")
    )
    FIGURES["hostile hub answers tried"] += 1


@pytest.mark.parametrize("name", BAD_NAMES)
def test_a_file_name_that_could_leave_the_folder_is_refused(hub, tmp_path, settings, name):
    repo_id = "lies/names"
    clone(hub, "tiny/llama", repo_id)
    extra = {"rfilename": name, "size": 2, "blobId": "a" * 40}
    hub.lie(repo_id, Lie(extra_files=[extra]))
    with pytest.raises(HubError) as exc:
        services.model_download(hf_repo_id=repo_id, quantization="FP16")
    assert exc.value.code == "bad_listing" and exc.value.status == 502
    assert not Model.objects.exists() and outside_files(tmp_path, settings) == []
    FIGURES["hostile hub answers tried"] += 1


@pytest.mark.parametrize("sha", ESCAPES[:3])
def test_the_dataset_route_refuses_the_same_lies(hub, texts_repo, tmp_path, settings, sha):
    repo_id = "lies/texts"
    clone(hub, texts_repo, repo_id, dataset=True)
    hub.lie(repo_id, Lie(sha=sha, extra_files=[{"rfilename": "../x.jsonl", "size": 1}]))
    with pytest.raises(HubError) as exc:
        dataset_services.dataset_import(hf_dataset_id=repo_id, text_field="text")
    assert exc.value.code == "bad_listing"
    assert not Dataset.objects.exists() and outside_files(tmp_path, settings) == []
    FIGURES["hostile hub answers tried"] += 1


@pytest.mark.parametrize(
    "size", [-1, "lots", 1.5, None], ids=["negative", "text", "float", "missing"]
)
def test_a_listed_size_that_is_not_a_byte_count_is_refused(hub, size):
    repo_id = "lies/sizes"
    clone(hub, "tiny/llama", repo_id)
    hub.lie(repo_id, Lie(sizes={"config.json": size}))
    with pytest.raises(HubError) as exc:
        services.model_download(hf_repo_id=repo_id, quantization="FP16")
    assert exc.value.code == "bad_listing"
    FIGURES["hostile hub answers tried"] += 1


def test_the_estimate_and_download_routes_answer_the_lie_with_a_4xx_or_502(hub, client: Client):
    repo_id = "lies/routes"
    clone(hub, "tiny/llama", repo_id)
    hub.lie(repo_id, Lie(sha="../../../../../../outside-the-cache"))
    answers = [
        client.post("/api/models/download", {"hf_repo_id": repo_id, "quantization": "Q4"},
                    content_type="application/json"),
        client.post("/models/estimate", {"hf_repo_id": repo_id}),
        client.post("/api/datasets", {"hf_dataset_id": repo_id, "text_field": "text"},
                    content_type="application/json"),
    ]  # fmt: skip
    assert [a.status_code for a in answers[:2]] == [502, 502]
    assert answers[2].status_code in (404, 502)  # no such dataset repo: refused either way
    assert b"not valid" in answers[0].content and b"not valid" in answers[1].content
    FIGURES["hostile hub answers tried"] += 3


@pytest.mark.parametrize(
    "lie",
    [
        Lie(commit_header="../../../../../../outside-the-cache"),
        Lie(etag="../../../../../../outside-the-blobs"),
        Lie(commit_header="../x", etag="/tmp/abs-etag"),
    ],
    ids=["commit-header", "etag", "both"],
)
def test_hostile_download_headers_are_never_used_as_paths(hub, tmp_path, settings, lie):
    repo_id = "lies/headers"
    clone(hub, "tiny/gpt2", repo_id)
    hub.lie(repo_id, lie)
    row = services.model_download(hf_repo_id=repo_id, quantization="FP16")
    tasks.model_download_task(row.pk)
    row.refresh_from_db()
    assert row.status == ModelStatus.QUANTIZING, row.error_message
    assert outside_files(tmp_path, settings) == []
    assert not list(Path(settings.MODELS_CACHE_DIR).rglob("*outside*"))
    assert not Path("/tmp/abs-etag").exists()
    FIGURES["hostile hub answers tried"] += 1


def _download(repo_id: str) -> Model:
    row = services.model_download(hf_repo_id=repo_id, quantization="FP16")
    tasks.model_download_task(row.pk)
    return Model.objects.get(pk=row.pk)


@pytest.mark.parametrize("ignore_range", [True, False], ids=["ignores-range", "honours-range"])
def test_a_stalled_transfer_ends_with_a_message_and_no_partial_files(hub, settings, ignore_range):
    settings.HUB_STALL_SECONDS = 2
    repo_id = "lies/stall"
    clone(hub, "tiny/llama", repo_id)
    hub.lie(repo_id, Lie(stall_after=64 * 1024, ignore_range=ignore_range))
    row = _download(repo_id)
    assert row.status == ModelStatus.ERROR
    assert "stalled" in row.error_message and "model.safetensors" in row.error_message
    assert incomplete(settings) == []
    FIGURES["hostile hub answers tried"] += 1


def test_a_stalled_dataset_transfer_ends_too(hub, texts_repo, settings):
    settings.HUB_STALL_SECONDS = 2
    repo_id = "lies/texts-stall"
    clone(hub, texts_repo, repo_id, dataset=True)
    hub.lie(repo_id, Lie(stall_after=10))
    row = dataset_services.dataset_import(hf_dataset_id=repo_id, text_field="text")
    dataset_tasks.dataset_import_task(row.pk)
    row.refresh_from_db()
    assert row.status == "error" and "stalled" in row.error_message
    assert not [p for p in Path(settings.DATASETS_DIR).rglob("*") if p.is_file()]


def test_a_slow_but_moving_transfer_is_never_killed(hub, settings):
    settings.HUB_STALL_SECONDS = 1
    repo_id = "lies/slow"
    clone(hub, "tiny/gpt2", repo_id)
    hub.lie(repo_id, Lie())
    total = sum(f.size for f in hub.repos[repo_id].commits[hub.repos[repo_id].main].values())
    hub.set_rate(total / 4)  # about 4 s in all, a chunk every few ms: slow, never silent
    row = _download(repo_id)
    assert row.status == ModelStatus.QUANTIZING, row.error_message


def test_a_dropped_connection_resumes_with_range(hub, settings):
    repo_id = "lies/drop"
    clone(hub, "tiny/gpt2", repo_id)
    lie = hub.lie(repo_id, Lie(drop_after=100 * 1024))
    row = _download(repo_id)
    assert row.status == ModelStatus.QUANTIZING, row.error_message
    ranged = [r for r in hub.requests if r.server == "cdn"]
    assert len(ranged) >= 2 and lie.drop_after


def test_a_dropped_connection_that_ignores_range_gives_up(hub, settings):
    repo_id = "lies/drop-norange"
    clone(hub, "tiny/gpt2", repo_id)
    hub.lie(repo_id, Lie(drop_after=100 * 1024, ignore_range=True))
    row = _download(repo_id)
    assert row.status == ModelStatus.ERROR and "kept failing" in row.error_message
    assert incomplete(settings) == []


@pytest.mark.parametrize("listed", [1000, 1], ids=["1000-bytes", "1-byte"])
def test_a_file_longer_than_listed_is_stopped(hub, settings, listed):
    repo_id = "lies/grows"
    clone(hub, "tiny/llama", repo_id)
    hub.lie(repo_id, Lie(sizes={"model.safetensors": listed}))
    row = _download(repo_id)
    assert row.status == ModelStatus.ERROR
    assert "grew past its listed size" in row.error_message
    assert "model.safetensors" in row.error_message and incomplete(settings) == []
    assert row.bytes_done <= row.bytes_total
    FIGURES["hostile hub answers tried"] += 1


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json", "model.safetensors"])
def test_a_file_that_does_not_match_its_checksum_is_refused(hub, settings, name):
    repo_id = "lies/checksum"
    clone(hub, "tiny/gpt2", repo_id)
    real = hub.repos[repo_id].commits[hub.repos[repo_id].main][name].data
    hub.lie(repo_id, Lie(bodies={name: bytes(reversed(real))}))  # same size, other bytes
    if name == "config.json":
        with pytest.raises(HubError) as exc:
            services.model_download(hf_repo_id=repo_id, quantization="FP16")
        assert exc.value.code == "checksum"
        return
    row = _download(repo_id)
    assert row.status == ModelStatus.ERROR and "checksum" in row.error_message
    assert name in row.error_message and incomplete(settings) == []
    FIGURES["hostile hub answers tried"] += 1


def _llama_config(hub, **changes) -> bytes:
    repo = hub.repos["tiny/llama"]
    config = json.loads(repo.commits[repo.main]["config.json"].data)
    return json.dumps({**config, **changes}).encode()


HOSTILE_CONFIGS = {
    "float-overflow": lambda hub: _llama_config(hub).replace(b'"hidden_size": 128', b'"hidden_size": 1e400'),  # noqa: E501
    "nan": lambda hub: _llama_config(hub).replace(b'"hidden_size": 128', b'"hidden_size": NaN'),
    "a-list": lambda hub: b"[1, 2, 3]",
    "empty-object": lambda hub: b"{}",
    "layers-text": lambda hub: _llama_config(hub, num_hidden_layers="lots"),
    "huge": lambda hub: _llama_config(hub, num_hidden_layers=10**9, hidden_size=10**7),
    "negative": lambda hub: _llama_config(hub, vocab_size=-5),
    "bool-layers": lambda hub: _llama_config(hub, num_hidden_layers=True),
    "nested": lambda hub: b'{"model_type": "llama", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "not-utf8": lambda hub: b'{"model_type": "\xff\xfe"}',
    "huge-int": lambda hub: _llama_config(hub, num_hidden_layers=10**400),
    "custom-code": lambda hub: _llama_config(hub, auto_map={"AutoModel": "x.Y"}, model_type="evil"),
}  # fmt: skip


@pytest.mark.parametrize("kind", sorted(HOSTILE_CONFIGS))
def test_a_hostile_config_is_a_4xx_with_a_message_on_every_route(hub, client: Client, kind):
    repo_id = f"lies/config-{kind}"
    repo = hub.repos["tiny/llama"]
    files = {path: f.data for path, f in repo.commits[repo.main].items()}
    hub.add_repo(repo_id, {**files, "config.json": HOSTILE_CONFIGS[kind](hub)})
    answers = {
        "api download": client.post("/api/models/download", {
            "hf_repo_id": repo_id, "quantization": "Q4"}, content_type="application/json"),
        "page download": client.post("/models/download", {
            "hf_repo_id": repo_id, "quantization": "Q4"}),
        "estimate": client.post("/models/estimate", {"hf_repo_id": repo_id}),
    }  # fmt: skip
    for route, answer in answers.items():
        assert 400 <= answer.status_code < 500, (route, answer.status_code, answer.content[:300])
        assert b"config.json" in answer.content or b"config" in answer.content, (route, answer)
    assert not Model.objects.exists()
    FIGURES["hostile config.json answers tried"] += len(answers)


def _weights(hub, source: str) -> bytes:
    repo = hub.repos[source]
    return repo.commits[repo.main]["model.safetensors"].data


def _header_len_2_62(data: bytes) -> bytes:
    return struct.pack("<Q", 2**62) + data[8:]


def _non_json_header(data: bytes) -> bytes:
    (n,) = struct.unpack("<Q", data[:8])
    return data[:8] + b"\x00not json" + b" " * (n - 9) + data[8 + n :]


def _past_the_end(data: bytes) -> bytes:
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    key = next(k for k in header if k != "__metadata__")
    header[key]["data_offsets"][1] += 10**9
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data[8 + n :]


HOSTILE_FILES = {
    "header-2-62": ("model.safetensors", lambda hub, src: _header_len_2_62(_weights(hub, src))),
    "header-not-json": ("model.safetensors", lambda hub, src: _non_json_header(_weights(hub, src))),
    "trailing-junk": ("model.safetensors", lambda hub, src: _weights(hub, src) + b"junk" * 100),
    "past-the-end": ("model.safetensors", lambda hub, src: _past_the_end(_weights(hub, src))),
    "tokenizer-types": ("tokenizer_config.json", lambda hub, src: json.dumps(
        {"bos_token": 5, "model_max_length": "lots", "add_bos_token": "yes"}).encode()),
    "tokenizer-max-length": ("tokenizer_config.json", lambda hub, src: json.dumps(
        {"model_max_length": "lots"}).encode()),
    "tokenizer-json": ("tokenizer.json", lambda hub, src: b"{not json"),
    "generation-list": ("generation_config.json", lambda hub, src: b"[1, 2]"),
}  # fmt: skip


@pytest.mark.parametrize("source", ["tiny/llama", "tiny/gpt2"])
@pytest.mark.parametrize("kind", sorted(HOSTILE_FILES))
def test_a_hostile_weight_or_tokenizer_file_ends_the_job_at_once_naming_it(
    hub, settings, source, kind
):
    name, make = HOSTILE_FILES[kind]
    repo_id = f"lies/file-{kind}-{source.split('/')[1]}"
    repo = hub.repos[source]
    files = {path: f.data for path, f in repo.commits[repo.main].items()}
    if name not in files:
        pytest.skip(f"{source} has no {name}")
    hub.add_repo(repo_id, {**files, name: make(hub, source)})
    row = services.model_download(hf_repo_id=repo_id, quantization="FP16")
    tasks.model_download_task(row.pk)
    row.refresh_from_db()
    assert row.status == ModelStatus.ERROR, (row.status, row.phase)
    assert name in row.error_message and "not a valid file" in row.error_message
    assert "crash" not in row.error_message and "memory" not in row.error_message
    snapshot = Path(settings.MODELS_CACHE_DIR) / f"models--{repo_id.replace('/', '--')}"
    assert not [p for p in snapshot.rglob("*") if p.is_file()]  # our files removed
    FIGURES["hostile weight/tokenizer files tried"] += 1


@pytest.mark.parametrize("kind", ["header-2-62", "trailing-junk", "tokenizer-types"])
def test_the_load_check_refuses_the_same_files_naming_them(hub, tmp_path, kind):
    """A snapshot that is already on disk (added from the cache) meets the same check in the
    GPU worker's load."""
    name, make = HOSTILE_FILES[kind]
    repo = hub.repos["tiny/llama"]
    folder = tmp_path / "snapshot"
    folder.mkdir()
    for path, f in repo.commits[repo.main].items():
        if "/" not in path:
            (folder / path).write_bytes(f.data)
    (folder / name).write_bytes(make(hub, "tiny/llama"))
    with pytest.raises(FileCheckError, match=name.replace(".", r"\.")):
        load_model(folder, "FP16", torch.device("cpu"))
    message = resident.load_failure_message("FP16", FileCheckError(f"{name} is not a valid file"))
    assert name in message and "memory" not in message
