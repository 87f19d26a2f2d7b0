"""Tiny real models for the ml/ tests, built offline once per session and loaded read-only.

`reference_branches` recomputes a block's attention and MLP outputs by calling its submodules by
hand (no hooks at all), per architecture: the independent reference the captured sites must match.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoTokenizer

from mistudio.testing.tiny_models import build_tiny_model
from models_app.ml.loading import load_model

ARCHES = ("gpt2", "llama", "gpt_neox", "qwen2", "phi")
N_LAYERS = 3
HIDDEN = 64
CPU = torch.device("cpu")

_WORDS = [
    *("the", "a", "model", "layer", "token", "stream", "residual", "attention", "sparse"),
    *("feature", "river", "garden", "train", "city", "morning", "question", "answer", "number"),
    *("history", "science", "window", "rose", "boat", "library", "weight", "cache"),
]


def corpus(n_docs: int, seed: int = 0, min_words: int = 3, max_words: int = 60) -> Iterator[str]:
    """A lazy stream of `n_docs` deterministic pseudo-English documents of varying length."""
    rng = random.Random(seed)
    for _ in range(n_docs):
        yield " ".join(rng.choice(_WORDS) for _ in range(rng.randint(min_words, max_words)))


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory):
    """arch -> folder of a saved 3-layer, d=64 tiny model with its own tokenizer."""
    root = tmp_path_factory.mktemp("tiny-repos")
    built: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in built:
            built[arch] = build_tiny_model(arch, root / arch, layers=N_LAYERS, hidden=HIDDEN)
        return built[arch]

    return get


@pytest.fixture(scope="session")
def tiny(tiny_repo):
    """(arch, quantization) -> (model, tokenizer), loaded once per session: do not modify them."""
    loaded: dict[tuple[str, str], tuple] = {}

    def get(arch: str, quantization: str = "FP16"):
        key = (arch, quantization)
        if key not in loaded:
            model, _ = load_model(tiny_repo(arch), quantization, CPU)
            loaded[key] = (model, AutoTokenizer.from_pretrained(tiny_repo(arch)))
        return loaded[key]

    return get


@pytest.fixture(scope="session")
def post_norm_model():
    """name -> an in-memory model: post-norm blocks (gemma2, olmo2: the branch terms are their
    post-branch norms' outputs), or blocks where no module outputs the term (bloom, mpt)."""

    def build(name: str):
        common = dict(vocab_size=384, num_hidden_layers=2, num_attention_heads=4, hidden_size=64)
        configs = {
            # norms after each branch: block adds norm(attn_out), not attn_out
            "gemma2": transformers.Gemma2Config(
                **common, intermediate_size=128, num_key_value_heads=4, head_dim=16
            ),
            "olmo2": transformers.Olmo2Config(**common, intermediate_size=128),
            # the attention and MLP modules add the residual themselves
            "bloom": transformers.BloomConfig(vocab_size=384, n_layer=2, n_head=4, hidden_size=64),
            # the MLP module adds the residual itself
            "mpt": transformers.MptConfig(vocab_size=384, n_layers=2, n_heads=4, d_model=64),
        }
        torch.manual_seed(0)
        return transformers.AutoModelForCausalLM.from_config(configs[name]).eval()

    return build


def causal_mask(batch: int, length: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive causal mask (B, 1, T, T): 0 on and below the diagonal, -inf above."""
    upper = torch.ones(length, length, dtype=torch.bool).triu(1)
    mask = torch.zeros(length, length, dtype=dtype).masked_fill(upper, float("-inf"))
    return mask.expand(batch, 1, length, length)


def reference_branches(model, arch: str, layer: int, h: torch.Tensor):
    """(attn_out, mlp_out), each (B, T, d), of block `layer` given its input h (B, T, d).

    Calls the block's submodules directly, written out per architecture from the HF source.
    """
    B, T, _ = h.shape
    mask = causal_mask(B, T, h.dtype)
    pos = torch.arange(T).expand(B, T)  # (B, T)
    with torch.inference_mode():
        if arch == "gpt2":
            blk = model.transformer.h[layer]
            a = blk.attn(blk.ln_1(h), attention_mask=mask)[0]
            return a, blk.mlp(blk.ln_2(h + a))
        if arch in ("llama", "qwen2"):
            blk, pe = model.model.layers[layer], model.model.rotary_emb(h, pos)
            x = blk.input_layernorm(h)
            a = blk.self_attn(hidden_states=x, attention_mask=mask, position_embeddings=pe)[0]
            return a, blk.mlp(blk.post_attention_layernorm(h + a))
        if arch == "gpt_neox":  # parallel residual: both branches read the block input
            blk, pe = model.gpt_neox.layers[layer], model.gpt_neox.rotary_emb(h, pos)
            a = blk.attention(blk.input_layernorm(h), attention_mask=mask, position_embeddings=pe)[
                0
            ]
            return a, blk.mlp(blk.post_attention_layernorm(h))
        if arch == "phi":  # parallel: one shared layernorm
            blk, pe = model.model.layers[layer], model.model.rotary_emb(h, pos)
            x = blk.input_layernorm(h)
            a = blk.self_attn(hidden_states=x, attention_mask=mask, position_embeddings=pe)[0]
            return a, blk.mlp(x)
    raise ValueError(arch)


def hidden_states(model, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """HF's own output_hidden_states (no hooks of ours): L + 1 tensors (B, T, d)."""
    with torch.inference_mode():
        return model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states


def assert_rel_close(got: torch.Tensor, want: torch.Tensor, tol: float = 1e-5) -> None:
    """‖got − want‖ / ‖want‖ ≤ tol, in float64 (activations here are ~1e-2, so atol is useless)."""
    assert got.shape == want.shape
    err = float((got.double() - want.double()).norm() / want.double().norm())
    assert err <= tol, f"relative error {err:.2e} > {tol:.0e}"
