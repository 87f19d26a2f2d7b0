"""Tiny repos shaped like the real Hub repos other tools trip over, built offline.

Each builder writes a loadable (or deliberately unloadable) repo folder with a tokenizer, for the
fake Hub. Shapes: sharded weights beside a second copy in another layout (Mistral's
`consolidated.safetensors`), mixture-of-experts models (Mixtral, Qwen2-MoE with a shared expert,
OLMoE), multimodal configs that nest the language model (Gemma 3, Mistral 3, Llava), configs
whose sizes are null or named otherwise (NemotronH's block pattern, Falcon's legacy names),
repos that need custom code, and block layouts for the hook sites (Gemma-2, OLMo-2, Falcon).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import safetensors.torch
import torch
import transformers as tf
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from mistudio.testing.tiny_models import (
    MAX_POSITIONS,
    VOCAB_SIZE,
    _no_progress_bars,
    build_tiny_model,
    build_tokenizer,
)

TEXT = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": MAX_POSITIONS,
    "bos_token_id": 0,  # the tiny tokenizer's specials (some configs default to others)
    "eos_token_id": 1,
    "pad_token_id": None,
}
VISION = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
          "num_attention_heads": 2, "image_size": 32, "patch_size": 8}  # fmt: skip


def _save(config: tf.PretrainedConfig, out: Path, *, seed: int = 0, **save) -> Path:
    """Build `config`'s model (causal LM, else image-text-to-text), save it with a tokenizer."""
    causal = config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    auto = tf.AutoModelForCausalLM if causal else tf.AutoModelForImageTextToText
    torch.manual_seed(seed)
    model = auto.from_config(config).eval()
    with _no_progress_bars():
        model.save_pretrained(out, **save)
    build_tokenizer(out, add_bos=True)
    return out


def _rewrite_config(out: Path, edit: Callable[[dict], None]) -> None:
    path = out / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config, indent=2))


# -- weight layouts -------------------------------------------------------------------------


def _consolidated_copy(out: Path) -> None:
    """The same weights again, under Mistral's native names, as consolidated.safetensors."""
    state = {}
    for shard in sorted(out.glob("model*.safetensors")):
        state.update(safetensors.torch.load_file(shard))
    renamed = {f"consolidated.{k.replace('model.', '')}": v.clone() for k, v in state.items()}
    safetensors.torch.save_file(renamed, out / "consolidated.safetensors")


def sharded_with_consolidated(out: Path) -> Path:
    """Five safetensors shards with their index, plus the same weights as consolidated.*."""
    config = tf.LlamaConfig(**{**TEXT, "hidden_size": 256, "intermediate_size": 512})
    _save(config, out, max_shard_size="1MB")
    shards = sorted(out.glob("model-*.safetensors"))
    if len(shards) < 3:
        raise RuntimeError(f"expected several shards, got {len(shards)}")
    _consolidated_copy(out)
    return out


def single_with_consolidated(out: Path) -> Path:
    """model.safetensors plus consolidated.safetensors (no index)."""
    build_tiny_model("llama", out, seed=3)
    _consolidated_copy(out)
    return out


def index_missing_shard(out: Path) -> Path:
    """A sharded repo whose index names a shard the repo does not have."""
    sharded_with_consolidated(out)
    sorted(out.glob("model-*.safetensors"))[1].unlink()
    return out


def consolidated_only(out: Path) -> Path:
    """Only Mistral's own layout: nothing transformers loads."""
    single_with_consolidated(out)
    (out / "model.safetensors").unlink()
    return out


# -- mixture of experts ------------------------------------------------------------------------


def mixtral(out: Path) -> Path:
    return _save(tf.MixtralConfig(**TEXT, num_local_experts=8, num_experts_per_tok=2), out)


def qwen2_moe(out: Path) -> Path:
    """Routed experts plus a shared expert in every layer."""
    config = tf.Qwen2MoeConfig(
        **TEXT, moe_intermediate_size=128, shared_expert_intermediate_size=256, num_experts=8,
        num_experts_per_tok=2, decoder_sparse_step=1,
    )  # fmt: skip
    return _save(config, out)


def olmoe(out: Path) -> Path:
    return _save(tf.OlmoeConfig(**TEXT, num_experts=8, num_experts_per_tok=2), out)


# -- configs that nest the language model ------------------------------------------------------


def gemma3_multimodal(out: Path) -> Path:
    config = tf.Gemma3Config(
        text_config={**TEXT, "head_dim": 32}, vision_config=VISION, mm_tokens_per_image=4
    )
    return _save(config, out)


def mistral3_multimodal(out: Path) -> Path:
    config = tf.Mistral3Config(
        text_config={**TEXT, "model_type": "mistral", "head_dim": 32},
        vision_config={**VISION, "model_type": "pixtral", "head_dim": 32},
    )
    return _save(config, out)


# -- sizes that are null or named otherwise ----------------------------------------------------


def nemotron_h(out: Path) -> Path:
    """A hybrid (Mamba, attention, MoE) whose config says `num_hidden_layers: null`: the layer
    count comes from its block pattern."""
    config = tf.NemotronHConfig(
        vocab_size=VOCAB_SIZE, hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, layers_block_type=["mamba", "attention", "moe", "mamba"],
        num_hidden_layers=None, mamba_num_heads=4, mamba_head_dim=32, ssm_state_size=16,
        n_groups=1, intermediate_size=256, moe_intermediate_size=128, n_routed_experts=4,
        num_experts_per_tok=2, moe_shared_expert_intermediate_size=128,
        max_position_embeddings=MAX_POSITIONS,
    )  # fmt: skip
    _save(config, out)
    _rewrite_config(out, lambda c: c.update(num_hidden_layers=None))
    return out


def gpt2_other_names(out: Path) -> Path:
    """GPT-2's own names (n_embd, n_layer, n_head, n_positions) and `n_inner: null` (the MLP
    width is then 4 × n_embd)."""
    config = tf.GPT2Config(
        vocab_size=VOCAB_SIZE, n_embd=128, n_layer=2, n_head=4, n_positions=MAX_POSITIONS,
        n_inner=None, bos_token_id=0, eos_token_id=1,
    )  # fmt: skip
    _save(config, out)
    _rewrite_config(out, lambda c: c.update(n_inner=None))
    return out


def llama_null_fields(out: Path) -> Path:
    """A Llama whose config leaves `num_key_value_heads` and `head_dim` null (transformers then
    uses the attention heads and hidden / heads)."""
    _save(tf.LlamaConfig(**{**TEXT, "num_key_value_heads": TEXT["num_attention_heads"]}), out)
    _rewrite_config(out, lambda c: c.update(num_key_value_heads=None, head_dim=None))
    return out


# -- custom code -------------------------------------------------------------------------------


def custom_code(out: Path, *, model_type: str | None = "mistudio_custom_lm") -> Path:
    """A repo that needs its own Python code: auto_map and a model type transformers lacks."""
    build_tiny_model("llama", out, seed=4)
    (out / "modeling_custom.py").write_text("raise RuntimeError('remote code must never run')\n")

    def custom(c: dict) -> None:
        c["auto_map"] = {"AutoConfig": "modeling_custom.CustomConfig",
                         "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}  # fmt: skip
        c["architectures"] = ["CustomForCausalLM"]
        if model_type is None:
            c.pop("model_type", None)
        else:
            c["model_type"] = model_type

    _rewrite_config(out, custom)
    return out


def post_norm_and_parallel(arch: str) -> Callable[[Path], Path]:
    """Block layouts the hook sites must handle: Gemma-2 and OLMo-2 (a norm after each branch;
    Gemma-2's heads are wider than the stream), Falcon-7B (adds attention into the MLP output
    in place)."""
    return lambda out: build_tiny_model(arch, out)


SHAPES: dict[str, Callable[[Path], Path]] = {
    "shapes/sharded-consolidated": sharded_with_consolidated,
    "shapes/single-consolidated": single_with_consolidated,
    "shapes/index-missing-shard": index_missing_shard,
    "shapes/consolidated-only": consolidated_only,
    "shapes/mixtral": mixtral,
    "shapes/qwen2-moe": qwen2_moe,
    "shapes/olmoe": olmoe,
    "shapes/gemma3-vision": gemma3_multimodal,
    "shapes/mistral3-vision": mistral3_multimodal,
    "shapes/nemotron-h": nemotron_h,
    "shapes/gpt2-other-names": gpt2_other_names,
    "shapes/llama-null-fields": llama_null_fields,
    "shapes/custom-code": custom_code,
    "shapes/custom-code-no-type": lambda out: custom_code(out, model_type=None),
    "shapes/gemma2": post_norm_and_parallel("gemma2"),
    "shapes/olmo2": post_norm_and_parallel("olmo2"),
    "shapes/falcon": post_norm_and_parallel("falcon"),
}


def build_shape(repo_id: str, root: Path) -> Path:
    """Build the repo `repo_id` of SHAPES under `root`; returns its folder."""
    return SHAPES[repo_id](Path(root) / repo_id.replace("/", "--"))
