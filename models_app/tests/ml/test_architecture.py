"""describe() against the real config and modules of tiny real models, quantized or not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from mistudio.testing.tiny_models import ARCHES, build_tiny_model
from models_app.ml.architecture import count_parameters, describe, describe_config
from models_app.ml.layers import find_blocks
from models_app.ml.loading import load_model

CPU = torch.device("cpu")
LAYERS, HIDDEN = 3, 128  # tiny_models: 4 heads, intermediate 2 × hidden, vocab 384


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("architecture")
    built: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in built:
            built[arch] = build_tiny_model(arch, root / arch, layers=LAYERS, hidden=HIDDEN)
        return built[arch]

    return get


def final_norm(model: nn.Module) -> nn.Module:
    """The real final norm, named per architecture (the code under test finds it by position)."""
    base = model.base_model
    for name in ("norm", "ln_f", "final_layer_norm", "final_layernorm"):
        if hasattr(base, name):
            return getattr(base, name)
    raise AssertionError(f"no final norm on {type(model).__name__}")


@pytest.mark.parametrize("arch", ARCHES)
def test_describe_numbers_equal_the_config_and_modules(repo, arch):
    model, _ = load_model(repo(arch), "FP16", CPU)
    config, arch_info = model.config, describe(model)
    assert arch_info["total_layers"] == config.num_hidden_layers == LAYERS
    assert arch_info["hidden_dimension"] == config.hidden_size == HIDDEN
    assert arch_info["attention_heads"] == config.num_attention_heads
    assert arch_info["parameters"] == sum(p.numel() for p in model.parameters())
    assert arch_info["config"] == {
        "vocab_size": config.vocab_size, "max_position": config.max_position_embeddings,
        "mlp_ratio": 2.0, "architecture": config.architectures[0], "model_type": arch,
        "num_experts": 0, "experts_per_token": 0, "multimodal": False,
    }  # fmt: skip
    layers = arch_info["layers"]
    assert [entry["index"] for entry in layers] == list(range(LAYERS + 3))
    assert layers[0] == {"index": 0, "type": "Embedding", "detail": f"Shape: 384 × {HIDDEN}"}
    assert layers[-2]["type"] == type(final_norm(model)).__name__
    assert layers[-1]["type"] == "Output" and layers[-1]["detail"].startswith(
        f"Shape: {HIDDEN} × 384"
    )


@pytest.mark.parametrize("arch", ARCHES)
def test_block_entries_take_the_mlp_sizes_from_the_real_modules(repo, arch):
    model, _ = load_model(repo(arch), "FP16", CPU)
    blocks = describe(model)["layers"][1 : LAYERS + 1]
    head_dim = HIDDEN // model.config.num_attention_heads
    for i, entry in enumerate(blocks):
        assert entry["type"] == f"TransformerBlock_{i}"
        assert entry["detail"] == (
            f"Attention: 4 heads × {head_dim} dims | MLP: {HIDDEN} → {2 * HIDDEN} → {HIDDEN}"
        )


def test_a_widened_mlp_module_shows_in_the_description(repo):
    """Change one block's real MLP: describe() follows the modules, not config.json."""
    model, _ = load_model(repo("llama"), "FP16", CPU)
    _, blocks = find_blocks(model)
    mlp = blocks[1].mlp
    mlp.gate_proj, mlp.up_proj = nn.Linear(HIDDEN, 320), nn.Linear(HIDDEN, 320)
    mlp.down_proj = nn.Linear(320, HIDDEN)
    details = [entry["detail"] for entry in describe(model)["layers"][1:3]]
    assert details[0].endswith(f"MLP: {HIDDEN} → {2 * HIDDEN} → {HIDDEN}")
    assert details[1].endswith(f"MLP: {HIDDEN} → 320 → {HIDDEN}")


@pytest.mark.parametrize("quantization", ["Q8", "Q4", "Q2"])
def test_quantized_models_are_described_by_their_logical_shapes(repo, quantization):
    fp16 = describe(load_model(repo("llama"), "FP16", CPU)[0])
    quantized, _ = load_model(repo("llama"), quantization, CPU)
    assert describe(quantized) == fp16
    assert count_parameters(quantized) == fp16["parameters"]


def test_gpt2_output_is_marked_tied_and_q2_keeps_its_mlp_sizes(repo):
    arch_info = describe(load_model(repo("gpt2"), "Q2", CPU)[0])
    assert arch_info["layers"][-1]["detail"] == f"Shape: {HIDDEN} × 384 (tied to the embedding)"
    assert arch_info["layers"][1]["detail"].endswith(f"MLP: {HIDDEN} → {2 * HIDDEN} → {HIDDEN}")
    assert arch_info["layers"][-2]["type"] == "LayerNorm"


@pytest.mark.parametrize("arch", ARCHES)
def test_describe_config_matches_the_loaded_model(repo, arch):
    config = json.loads((repo(arch) / "config.json").read_text())
    before, after = describe_config(config), describe(load_model(repo(arch), "FP16", CPU)[0])
    for key in ("total_layers", "hidden_dimension", "attention_heads", "kv_heads", "parameters"):
        assert before[key] == after[key], key
    assert before["config"] == after["config"]
    assert [e["detail"] for e in before["layers"][1:-2]] == [
        e["detail"] for e in after["layers"][1:-2]
    ]


def test_describe_config_reads_gpt2_names_and_a_default_mlp_width():
    config = {
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": 50257,
        "n_embd": 768, "n_layer": 12, "n_head": 12, "n_positions": 1024, "n_inner": None,
        "activation_function": "gelu_new",
    }  # fmt: skip
    arch_info = describe_config(config)
    assert arch_info["parameters"] == 124_439_808
    assert arch_info["config"]["mlp_ratio"] == 4.0 and arch_info["config"]["max_position"] == 1024
    assert (
        arch_info["layers"][1]["detail"] == "Attention: 12 heads × 64 dims | MLP: 768 → 3072 → 768"
    )
    assert arch_info["layers"][-1]["detail"] == "Shape: 768 × 50257 (tied to the embedding)"


def test_describe_config_shows_grouped_query_attention():
    config = {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 32000,
        "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
        "num_attention_heads": 32, "num_key_value_heads": 4, "hidden_act": "silu",
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
    }  # fmt: skip
    arch_info = describe_config(config)
    assert arch_info["kv_heads"] == 4 and arch_info["config"]["mlp_ratio"] == 2.75
    assert arch_info["layers"][1]["detail"] == (
        "Attention: 32 heads × 64 dims (4 KV heads) | MLP: 2048 → 5632 → 2048"
    )
    # the real module names, as the loaded model will show them
    assert arch_info["layers"][-2]["type"] == "LlamaRMSNorm" and len(arch_info["layers"]) == 25
