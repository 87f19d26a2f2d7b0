"""Estimates from config.json against real models: parameter counts and loaded footprints."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    PhiConfig,
    Qwen2Config,
)

from mistudio.humanize import bytes_h, params_h
from mistudio.testing.tiny_models import build_tiny_model
from models_app.ml.estimate import (
    RUNTIME_OVERHEAD,
    estimate_memory,
    estimate_parameters,
    fit_label,
)
from models_app.ml.loading import QUANTIZATIONS, load_model

CPU = torch.device("cpu")
GB = 10**9

# Realistic shapes, published config values.
REAL_SHAPES = {
    "gpt2-small": GPT2Config(),
    "tinyllama-1.1b": LlamaConfig(
        vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
        num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
    ),
    "pythia-160m": GPTNeoXConfig(
        vocab_size=50304, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=2048,
    ),
    "qwen2-0.5b": Qwen2Config(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True,
    ),
    "phi-2": PhiConfig(
        vocab_size=51200, hidden_size=2560, intermediate_size=10240, num_hidden_layers=32,
        num_attention_heads=32, max_position_embeddings=2048,
    ),
}  # fmt: skip


def meta_parameter_count(config) -> int:
    """The real count of a randomly initialised model, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", list(REAL_SHAPES))
def test_parameter_estimate_equals_the_real_model(name):
    config = REAL_SHAPES[name]
    real = meta_parameter_count(config)
    assert estimate_parameters(config.to_diff_dict()) == pytest.approx(real, rel=0.02)
    assert estimate_parameters(config.to_dict()) == pytest.approx(real, rel=0.02)


def test_known_published_parameter_counts():
    assert estimate_parameters(REAL_SHAPES["gpt2-small"].to_dict()) == 124_439_808
    assert estimate_parameters(REAL_SHAPES["tinyllama-1.1b"].to_dict()) == 1_100_048_384
    assert params_h(estimate_parameters(REAL_SHAPES["qwen2-0.5b"].to_dict())) == "494M"


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory):
    return build_tiny_model("llama", tmp_path_factory.mktemp("estimate") / "llama", hidden=256)


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    return build_tiny_model("gpt2", tmp_path_factory.mktemp("estimate") / "gpt2")


@pytest.mark.parametrize("repo", ["wide_llama", "tiny_gpt2"])
def test_fp16_estimate_is_within_15_percent_of_real_16bit_weights(request, repo):
    folder = request.getfixturevalue(repo)
    model, _ = load_model(folder, "FP16", CPU)
    real = sum(p.numel() for p in model.parameters()) * 2 * (1 + RUNTIME_OVERHEAD)
    config = json.loads((folder / "config.json").read_text())
    assert estimate_memory(config)["FP16"] == pytest.approx(real, rel=0.15)


@pytest.mark.parametrize("quantization", QUANTIZATIONS)
def test_cpu_estimate_is_within_15_percent_of_the_measured_footprint(wide_llama, quantization):
    _, report = load_model(wide_llama, quantization, CPU)
    config = json.loads((wide_llama / "config.json").read_text())
    expected = report.footprint_bytes * (1 + RUNTIME_OVERHEAD)
    assert estimate_memory(config, device_kind="cpu")[quantization] == pytest.approx(
        expected, rel=0.15
    )


def test_memory_estimate_for_tinyllama_matches_the_h100_measurement():
    """architecture.md: weights on an H100 were FP16 2.20, Q8 1.24, Q4 0.78, Q2 0.54 GB."""
    measured = {"FP16": 2.20, "Q8": 1.24, "Q4": 0.78, "Q2": 0.54}
    estimate = estimate_memory(REAL_SHAPES["tinyllama-1.1b"].to_dict())
    for quantization, gigabytes in measured.items():
        weights = estimate[quantization] / (1 + RUNTIME_OVERHEAD)
        assert weights == pytest.approx(gigabytes * GB, rel=0.10), quantization
    assert estimate["FP16"] > estimate["Q8"] > estimate["Q4"] > estimate["Q2"]


GPU = {"kind": "cuda", "free_bytes": 10 * GB, "total_bytes": 80 * GB, "used_bytes": 70 * GB}
HOST = {"kind": "cpu", "free_bytes": 10 * GB, "total_bytes": 16 * GB, "used_bytes": 6 * GB}


@pytest.mark.parametrize(
    ("required", "device", "expected"),
    [
        (8 * GB, GPU, ("full", "Fits on GPU")),
        (8 * GB, HOST, ("full", "Fits in memory")),
        (int(9.5 * GB), GPU, ("partial", "Tight fit on GPU")),
        (int(10.5 * GB), HOST, ("partial", "Tight fit in memory")),
        (12 * GB, GPU, ("too_large", "Likely too large")),
    ],
)
def test_fit_label(required, device, expected):
    assert fit_label(required, device) == expected


@pytest.mark.parametrize(
    ("n", "text"),
    [(124_439_808, "124M"), (1_100_048_384, "1.1B"), (7_241_732_096, "7.2B"),
     (13_015_864_320, "13B"), (557_696, "558K"), (999, "999"), (2_000_000_000, "2B")],
)  # fmt: skip
def test_format_params(n, text):
    assert params_h(n) == text


@pytest.mark.parametrize(
    ("n", "text"),
    [(2_200_000_000, "2.2 GB"), (13_400_000, "13.4 MB"), (512, "512 B"), (4_000, "4.0 KB")],
)
def test_format_bytes(n, text):
    assert bytes_h(n) == text
