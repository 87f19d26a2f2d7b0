"""Repos shaped like the real Hub (issue: any model a researcher brings): one copy of the
weights, mixture-of-experts counted and quantized, nested and hybrid configs, custom code refused
before any byte. Every shape is a tiny real repo on the fake Hub (mistudio.testing.hub_shapes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

from mistudio.errors import Invalid
from mistudio.testing.hub_shapes import build_shape
from models_app import resident, services
from models_app.ml.layers import find_blocks
from models_app.models import Model, ModelStatus

from .helpers import cache_files, download, extract, text_dataset

pytestmark = pytest.mark.django_db(transaction=True)

MOE = ["shapes/mixtral", "shapes/qwen2-moe", "shapes/olmoe"]
NESTED = ["shapes/gemma3-vision", "shapes/mistral3-vision"]
ODD_CONFIGS = ["shapes/nemotron-h", "shapes/gpt2-other-names", "shapes/llama-null-fields"]


def _resolved(hub) -> set[str]:
    """Files whose bodies the hub or its CDN was asked for (config fetches included)."""
    return {r.path.rsplit("/", 1)[-1] for r in hub.requests if "/resolve/" in r.path}


# -- one copy of the weights --------------------------------------------------------------------


def test_an_index_fetches_exactly_the_shards_it_names_never_a_second_copy(hub, shapes, settings):
    folder = shapes["shapes/sharded-consolidated"]
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    row = download("shapes/sharded-consolidated", "FP16")
    assert row.status == ModelStatus.READY, row.error_message
    names = [f["name"] for f in row.files]
    assert set(shards) <= set(names) and "consolidated.safetensors" not in names
    assert sorted(n for n in names if n.endswith(".safetensors")) == shards
    expected = sum((folder / n).stat().st_size for n in names)
    assert row.bytes_total == row.size_bytes == expected
    assert not [f for f in cache_files(settings) if f.endswith("/consolidated.safetensors")]


def test_a_single_file_repo_takes_model_safetensors_and_leaves_other_layouts(hub, shapes):
    row = download("shapes/single-consolidated", "FP16")
    assert row.status == ModelStatus.READY, row.error_message
    weights = [f["name"] for f in row.files if f["name"].endswith(".safetensors")]
    assert weights == ["model.safetensors"]


@pytest.mark.parametrize(
    ("repo", "words"),
    [
        ("shapes/index-missing-shard", "names 1 file(s) the repo does not have"),
        ("shapes/consolidated-only", "no model.safetensors or model.safetensors.index.json"),
    ],
)
def test_weights_transformers_cannot_load_are_refused_before_any_weight_byte(
    client, hub, shapes, repo, words
):
    hub.requests.clear()
    r = client.post(
        "/api/models/download",
        {"hf_repo_id": repo, "quantization": "Q4"},
        content_type="application/json",
    )
    assert r.status_code == 422 and words in r.json()["detail"], r.content
    assert not Model.objects.exists()
    assert not {n for n in _resolved(hub) if n.endswith(".safetensors")}


# -- mixture of experts --------------------------------------------------------------------------


@pytest.mark.parametrize("repo", MOE)
def test_the_moe_estimate_counts_every_expert_and_the_active_ones(hub, shapes, repo):
    estimate = services.model_estimate(hf_repo_id=repo)
    row = download(repo, "FP16")
    assert row.status == ModelStatus.READY, row.error_message
    model, _ = resident.model_resident(row.pk)
    real = sum(p.numel() for p in model.parameters())
    counts = estimate["counts"]
    assert estimate["params"] == counts["total"] == real == row.params
    assert counts["num_experts"] > counts["experts_per_token"] > 0
    assert counts["experts"] > real / 2 and counts["active"] < real - counts["experts"] / 2


@pytest.mark.parametrize("repo", MOE)
def test_q8_q4_q2_really_quantize_the_experts(hub, shapes, repo):
    fp16 = download(repo, "FP16").mem_req_bytes
    sizes = {}
    for quantization in ("Q8", "Q4", "Q2"):
        row = download(repo, quantization)
        assert row.status == ModelStatus.READY, row.error_message
        load = row.metadata["load"]
        assert load["quantized_experts"] > 0 and "expert by expert" in row.load_notice
        sizes[quantization] = row.mem_req_bytes
        _, report = resident.model_resident(row.pk)
        assert report.quantized_experts == report.expert_weights == load["quantized_experts"]
        assert row.mem_req_bytes == report.footprint_bytes
    assert fp16 > sizes["Q8"] > sizes["Q4"] > sizes["Q2"]
    assert sizes["Q4"] < 0.3 * fp16  # experts stayed float32 before: ~98% of FP16 on CPU


@pytest.mark.parametrize("repo", MOE)
def test_the_memory_estimate_of_a_moe_model_matches_its_measured_footprint(hub, shapes, repo):
    rows = {r["quantization"]: r["bytes"] for r in services.model_estimate(hf_repo_id=repo)["rows"]}
    for quantization in ("Q4", "Q2"):
        measured = download(repo, quantization).mem_req_bytes * 1.2  # + runtime overhead
        assert rows[quantization] == pytest.approx(measured, rel=0.15), quantization


# -- nested and odd configs ----------------------------------------------------------------------


def _reference_block_outputs(folder: Path, token_ids: torch.Tensor, layer: int) -> torch.Tensor:
    """Plain transformers, its own forward hook on decoder block `layer`: (n, T, d)."""
    config = json.loads((folder / "config.json").read_text())
    causal = config.get("model_type") not in ("gemma3", "mistral3")
    auto = AutoModelForCausalLM if causal else AutoModelForImageTextToText
    model = auto.from_pretrained(folder, dtype=torch.float32).eval()
    decoder = model.get_decoder()
    blocks = decoder.layers if hasattr(decoder, "layers") else decoder.h  # GPT-2 names them h
    seen: list[torch.Tensor] = []
    handle = blocks[layer].register_forward_hook(
        lambda module, args, out: seen.append((out[0] if isinstance(out, tuple) else out).clone())
    )
    try:
        with torch.no_grad():
            model(input_ids=token_ids.long())
    finally:
        handle.remove()
    return seen[0]


@pytest.mark.parametrize("repo", NESTED + ODD_CONFIGS)
def test_nested_and_odd_configs_load_describe_and_extract_like_transformers(hub, shapes, repo):
    folder = shapes[repo]
    estimate = services.model_estimate(hf_repo_id=repo)
    row = download(repo, "FP16")
    assert row.status == ModelStatus.READY, row.error_message
    model, _ = resident.model_resident(row.pk)
    _, blocks = find_blocks(model)
    assert row.num_layers == len(blocks) and row.hidden_dim == 128
    assert estimate["params"] == sum(p.numel() for p in model.parameters()) == row.params
    if repo in NESTED:
        counts = estimate["counts"]
        assert counts["language_model"] < counts["total"]
        assert row.metadata["architecture"]["config"]["multimodal"] is True
    job = extract(row, text_dataset(), layers=[0, 1], hook_types=["residual"], max_samples=4)
    assert job.status == "completed", job.error_message
    for layer in (0, 1):
        shard = load_file(
            Path(job.output_path) / f"shards/blocks.{layer}.hook_resid_post/000000.safetensors"
        )
        expected = _reference_block_outputs(folder, shard["token_ids"], layer)
        torch.testing.assert_close(shard["activations"], expected, rtol=1e-5, atol=1e-5)


def test_a_load_check_failure_ends_the_row_at_once_with_its_real_cause(hub, shapes, tmp_path):
    """Weights that do not fit their config: the row is `error` when the task returns, with
    transformers' reason; no word of a crash or of memory."""
    folder = build_shape("shapes/mixtral", tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = 512  # the saved experts are 256 wide
    (folder / "config.json").write_text(json.dumps(config))
    hub.add_repo("shapes/mixtral-mismatch", folder)
    row = download("shapes/mixtral-mismatch", "Q4")
    assert row.status == ModelStatus.ERROR
    message = row.error_message.lower()
    assert "loading at q4 failed" in message and "shapes its config.json describes" in message
    assert "crash" not in message and "memory" not in message


# -- custom code ---------------------------------------------------------------------------------


@pytest.mark.parametrize("repo", ["shapes/custom-code", "shapes/custom-code-no-type"])
def test_repos_that_need_custom_code_are_refused_before_any_weight_byte(client, hub, shapes, repo):
    hub.requests.clear()
    for path in ("/api/models/download", "/models/estimate"):
        data = {"hf_repo_id": repo, "quantization": "FP16"}
        if path.startswith("/api"):
            r = client.post(path, data, content_type="application/json")
            detail = r.json()["detail"]
        else:
            r = client.post(path, data, headers={"HX-Request": "true"})
            detail = r.content.decode()
        assert r.status_code == 422, r.content
        assert "trust_remote_code" in detail and "never enables" in detail
        assert "hf.co" not in detail and str(shapes[repo]) not in detail
    assert not Model.objects.exists()
    assert _resolved(hub) <= {"config.json"}


def test_a_refused_custom_code_repo_raises_invalid_from_the_service(hub, shapes):
    with pytest.raises(Invalid) as err:
        services.model_download(hf_repo_id="shapes/custom-code", quantization="FP16")
    assert err.value.code == "unsupported_model"
