"""The fake Hub and the tiny models, driven through unmodified huggingface_hub and transformers."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections import defaultdict
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from mistudio.testing.fakehub import UNAPPROVED_TOKEN, VALID_TOKEN, FakeHub
from mistudio.testing.tiny_models import (
    BOS_ID,
    EOS_ID,
    VOCAB_SIZE,
    build_catalogue,
    build_tiny_model,
)

MODEL_FILES = ["*.safetensors", "*.json"]
EXPECTED_MODEL_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
}


@pytest.fixture
def hub():
    """A fake hub serving the tiny catalogue, also set as the default endpoint (HF_ENDPOINT)."""
    with FakeHub() as hub, hub.activate():
        hub.add_catalogue()
        yield hub


@pytest.fixture(scope="module")
def catalogue() -> dict[str, Path]:
    return build_catalogue()


def _recorder() -> tuple[type[tqdm], dict[str, list[float]]]:
    """A tqdm class that remembers every bar's `n` after each update, keyed by the bar's desc."""
    seen: dict[str, list[float]] = defaultdict(list)

    class Recorder(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = False
            super().__init__(*args, **kwargs)

        def update(self, n=1):
            result = super().update(n)
            seen[self.desc].append(self.n)
            return result

    return Recorder, seen


def _sizes(folder: Path) -> dict[str, int]:
    return {
        p.relative_to(folder).as_posix(): p.stat().st_size for p in folder.rglob("*") if p.is_file()
    }


# -- metadata --------------------------------------------------------------------------------


def test_model_info_lists_every_file_with_its_real_size(hub, catalogue):
    info = HfApi().model_info("tiny/llama", files_metadata=True, token=False)

    assert info.sha == hub.repos["tiny/llama"].main
    assert {s.rfilename: s.size for s in info.siblings} == _sizes(catalogue["tiny/llama"])
    weights = next(s for s in info.siblings if s.rfilename == "model.safetensors")
    data = (catalogue["tiny/llama"] / "model.safetensors").read_bytes()
    assert weights.lfs.sha256 == hashlib.sha256(data).hexdigest()
    assert next(s for s in info.siblings if s.rfilename == "config.json").lfs is None
    assert info.safetensors.total > 0 and info.gated is False


def test_model_info_has_no_sizes_without_files_metadata(hub):
    info = HfApi(endpoint=hub.endpoint).model_info("tiny/gpt2", token=False)

    assert info.siblings and all(s.size is None for s in info.siblings)


def test_list_repo_files_includes_nested_files(hub):
    files = HfApi(endpoint=hub.endpoint).list_repo_files("tiny/llama", token=False)

    assert "onnx/model.onnx" in files and "README.md" in files


def test_dry_run_reports_the_real_sizes_and_writes_nothing(hub, catalogue, tmp_path):
    infos = snapshot_download("tiny/llama", cache_dir=tmp_path, dry_run=True, token=False)

    assert {i.filename: i.file_size for i in infos} == _sizes(catalogue["tiny/llama"])
    assert all(i.will_download and not i.is_cached for i in infos)
    assert not list(tmp_path.rglob("blobs/*"))


def test_safetensors_metadata_comes_from_the_header(hub, catalogue):
    meta = HfApi(endpoint=hub.endpoint).get_safetensors_metadata("tiny/qwen2", token=False)

    model = AutoModelForCausalLM.from_pretrained(catalogue["tiny/qwen2"])
    assert meta.parameter_count == {"F32": sum(p.numel() for p in model.parameters())}


# -- downloads -------------------------------------------------------------------------------


def test_filtered_snapshot_fetches_only_model_files_with_steady_progress(hub, tmp_path):
    dry = snapshot_download(
        "tiny/llama", cache_dir=tmp_path, allow_patterns=MODEL_FILES, dry_run=True, token=False
    )
    bar_class, seen = _recorder()

    folder = snapshot_download(
        "tiny/llama", cache_dir=tmp_path, allow_patterns=MODEL_FILES, tqdm_class=bar_class
    )

    assert {p.name for p in Path(folder).iterdir()} == EXPECTED_MODEL_FILES
    fetched = {r.path.rsplit("/", 1)[-1] for r in hub.requests if "/resolve/" in r.path}
    assert fetched == EXPECTED_MODEL_FILES
    progress = seen["Downloading bytes"]
    assert progress == sorted(progress)
    assert progress[-1] == sum(i.file_size for i in dry)


def test_lfs_bodies_come_from_the_cdn_without_the_token(hub, tmp_path):
    snapshot_download(
        "tiny/gpt2", cache_dir=tmp_path, allow_patterns=MODEL_FILES, token=VALID_TOKEN
    )

    cdn = [r for r in hub.requests if r.server == "cdn"]
    assert len(cdn) == 1 and not cdn[0].had_authorization
    assert all(r.token_used == VALID_TOKEN for r in hub.requests if r.server == "hub")
    assert VALID_TOKEN not in repr(hub.requests)


def test_single_file_download_reports_its_bytes(hub, catalogue, tmp_path):
    bar_class, seen = _recorder()

    path = hf_hub_download(
        "tiny/llama", "model.safetensors", cache_dir=tmp_path, tqdm_class=bar_class, token=False
    )

    expected = (catalogue["tiny/llama"] / "model.safetensors").read_bytes()
    assert Path(path).read_bytes() == expected
    assert seen["model.safetensors"][-1] == len(expected)


@pytest.mark.parametrize(
    ("repo_id", "adds_bos"),
    [
        ("tiny/llama", True),
        ("tiny/qwen2", True),
        ("tiny/gpt2", False),
        ("tiny/gpt-neox", False),
        ("tiny/phi", False),
    ],
)
def test_a_downloaded_snapshot_loads_and_runs(hub, tmp_path, repo_id, adds_bos):
    folder = snapshot_download(repo_id, cache_dir=tmp_path, allow_patterns=MODEL_FILES)

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    ids = tokenizer("The quick brown fox", return_tensors="pt").input_ids
    assert (ids[0, 0].item() == BOS_ID) is adds_bos
    assert tokenizer.eos_token_id == EOS_ID and len(tokenizer) == VOCAB_SIZE
    with torch.no_grad():
        assert model(ids).logits.shape == (1, ids.shape[1], VOCAB_SIZE)


def test_auto_config_finds_the_hub_through_hf_endpoint(hub, tmp_path):
    config = AutoConfig.from_pretrained("tiny/gpt-neox", cache_dir=tmp_path)

    assert config.use_parallel_residual is True
    assert any(r.path.endswith("/config.json") for r in hub.requests)


def test_a_new_commit_moves_main_and_keeps_the_old_sha(hub, tmp_path):
    first = hub.add_repo("me/notes", {"config.json": b'{"v": 1}'})
    second = hub.add_repo("me/notes", {"config.json": b'{"v": 2}'})

    old = hf_hub_download("me/notes", "config.json", revision=first, cache_dir=tmp_path)
    new = hf_hub_download("me/notes", "config.json", cache_dir=tmp_path)
    assert Path(old).read_bytes() == b'{"v": 1}' and Path(new).read_bytes() == b'{"v": 2}'
    assert HfApi().model_info("me/notes", token=False).sha == second


# -- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("repo_id", "token", "error", "status"),
    [
        ("tiny/gated-llama", False, GatedRepoError, 401),
        ("tiny/gated-llama", UNAPPROVED_TOKEN, GatedRepoError, 403),
        ("tiny/llama", "hf_notarealtoken", HfHubHTTPError, 401),
        ("nobody/nothing", False, RepositoryNotFoundError, 401),
        ("nobody/nothing", VALID_TOKEN, RepositoryNotFoundError, 404),
        ("me/secret", UNAPPROVED_TOKEN, RepositoryNotFoundError, 404),
    ],
)
def test_auth_check_raises_the_hubs_own_errors(hub, repo_id, token, error, status):
    hub.add_repo("me/secret", {"config.json": b"{}"}, private=True)

    with pytest.raises(error) as raised:
        HfApi().auth_check(repo_id, token=token)

    assert raised.value.response.status_code == status
    assert error is not HfHubHTTPError or not isinstance(raised.value, RepositoryNotFoundError)


def test_an_approved_token_opens_gated_and_private_repos(hub, tmp_path):
    hub.add_repo("me/secret", {"config.json": b"{}"}, private=True)

    HfApi().auth_check("tiny/gated-llama", token=VALID_TOKEN)
    HfApi().auth_check("me/secret", token=VALID_TOKEN)
    path = hf_hub_download("tiny/gated-llama", "config.json", cache_dir=tmp_path, token=VALID_TOKEN)
    assert Path(path).is_file()


def test_a_gated_repo_shows_its_metadata_but_not_its_files(hub, tmp_path):
    info = HfApi().model_info("tiny/gated-llama", files_metadata=True, token=False)

    assert info.gated == "manual" and info.siblings
    with pytest.raises(GatedRepoError):
        snapshot_download("tiny/gated-llama", cache_dir=tmp_path, dry_run=True, token=False)


def test_an_unknown_revision_raises_revision_not_found(hub, tmp_path):
    with pytest.raises(RevisionNotFoundError):
        HfApi().model_info("tiny/llama", revision="no-such-branch", token=False)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download("tiny/llama", "config.json", revision="v9", cache_dir=tmp_path)


def test_an_unknown_file_raises_entry_not_found(hub, tmp_path):
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("tiny/llama", "nope.txt", cache_dir=tmp_path, token=False)


# -- throttling and pausing --------------------------------------------------------------------


def _timed_download(hub: FakeHub, cache_dir: Path) -> float:
    start = time.monotonic()
    hf_hub_download("tiny/gpt2", "model.safetensors", cache_dir=cache_dir, token=False)
    return time.monotonic() - start


def test_throttling_slows_a_download_and_splits_its_progress(hub, tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", 64 * 1024)
    full_speed = _timed_download(hub, tmp_path / "fast")
    hub.set_rate(3_000_000)
    bar_class, seen = _recorder()

    start = time.monotonic()
    hf_hub_download(
        "tiny/gpt2", "model.safetensors", cache_dir=tmp_path / "slow", tqdm_class=bar_class
    )
    throttled = time.monotonic() - start

    total = seen["model.safetensors"][-1]
    assert throttled >= 0.9 * total / 3_000_000 > full_speed
    assert len(seen["model.safetensors"]) >= 10


def test_pause_holds_a_body_mid_file_until_resume(hub, catalogue, tmp_path):
    hub.pause(after_bytes=64 * 1024)
    result: dict[str, str] = {}
    worker = threading.Thread(
        target=lambda: result.update(
            path=hf_hub_download("tiny/llama", "model.safetensors", cache_dir=tmp_path)
        ),
        daemon=True,
    )
    worker.start()

    assert hub.wait_until_held(1, timeout=5)
    assert worker.is_alive() and hub.held == 1
    assert not list(tmp_path.rglob("snapshots/*/model.safetensors"))
    sent_while_held = hub.bytes_sent
    hub.resume()
    worker.join(timeout=10)

    expected = (catalogue["tiny/llama"] / "model.safetensors").read_bytes()
    assert sent_while_held <= 64 * 1024 < len(expected)
    assert Path(result["path"]).read_bytes() == expected


def test_release_lets_the_held_body_finish_and_holds_the_next_one(hub, catalogue, tmp_path):
    hub.pause(after_bytes=0)
    names = ["config.json", "tokenizer.json"]
    done: list[str] = []

    def fetch() -> None:
        for name in names:
            hf_hub_download("tiny/llama", name, cache_dir=tmp_path)
            done.append(name)

    worker = threading.Thread(target=fetch, daemon=True)
    worker.start()
    assert hub.wait_until_held(1, timeout=30)
    holds = hub.valve.holds
    hub.release_held()
    assert hub.wait_until_held(1, timeout=30, holds=holds + 1)
    assert done == ["config.json"] and worker.is_alive()
    hub.resume()
    worker.join(timeout=30)
    assert done == names


def test_stop_releases_its_ports():
    hub = FakeHub()
    endpoint = hub.endpoint
    hub.stop()
    hub.stop()

    with pytest.raises(Exception):  # noqa: B017 - any connection error will do
        HfApi(endpoint=endpoint).model_info("tiny/llama", token=False)


# -- tiny models -------------------------------------------------------------------------------


def test_tiny_models_are_deterministic_per_seed(tmp_path):
    same = [build_tiny_model("phi", tmp_path / name) for name in ("a", "b")]
    other = build_tiny_model("phi", tmp_path / "c", seed=1)

    weights = [(p / "model.safetensors").read_bytes() for p in (*same, other)]
    assert weights[0] == weights[1] != weights[2]


def test_the_catalogue_has_the_promised_shapes(catalogue):
    assert set(catalogue) == {
        "tiny/llama",
        "tiny/gpt2",
        "tiny/gpt-neox",
        "tiny/qwen2",
        "tiny/phi",
        "tiny/gated-llama",
        "tiny/pickle-only",
        "tiny/llama-big",
    }
    assert not list(catalogue["tiny/pickle-only"].glob("*.safetensors"))
    assert (catalogue["tiny/pickle-only"] / "pytorch_model.bin").is_file()
    assert 20e6 <= (catalogue["tiny/llama-big"] / "model.safetensors").stat().st_size <= 40e6
    for folder in catalogue.values():
        config = AutoConfig.from_pretrained(folder)
        assert (config.vocab_size, config.bos_token_id, config.eos_token_id) == (
            VOCAB_SIZE,
            BOS_ID,
            EOS_ID,
        )


def test_activate_restores_the_previous_endpoint(monkeypatch):
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    before = huggingface_hub.constants.ENDPOINT

    with FakeHub() as other, other.activate():
        assert other.endpoint == huggingface_hub.constants.ENDPOINT
        assert huggingface_hub.constants.HUGGINGFACE_CO_URL_TEMPLATE.startswith(other.endpoint)

    assert before == huggingface_hub.constants.ENDPOINT
    assert "HF_ENDPOINT" not in os.environ
