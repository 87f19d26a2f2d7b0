"""Parameter count and memory per quantization from config.json alone, before any download.

Dense decoder: P = L·(attention + MLP + biases + norms) + V·h·(1 if tied else 2) + final norm
(+ learned positions). Linear weights are stored at the quantization's bytes per weight; embeddings,
lm_head, norms and biases stay at 16 bits (32 on CPU), as bitsandbytes and optimum-quanto keep them.
"""

from __future__ import annotations

from dataclasses import dataclass

from .loading import QUANTIZATIONS

# Bytes per Linear weight. Q8 int8 (+ a row scale), NF4 with double quant ≈0.52, quanto int2 with
# a 16-bit scale and shift per group of 128 ≈0.28 (float32 scales on CPU ≈0.32). On CPU the FP16
# option really runs in float32.
LINEAR_BYTES = {
    "cuda": {"FP16": 2.0, "Q8": 1.0, "Q4": 0.52, "Q2": 0.28},
    "cpu": {"FP16": 4.0, "Q8": 1.0, "Q4": 0.52, "Q2": 0.32},
}
OTHER_BYTES = {"cuda": 2, "cpu": 4}  # embeddings, lm_head, norms, biases
RUNTIME_OVERHEAD = 0.20  # activations, KV cache, allocator slack on top of the weights
FIT_MARGIN = 0.10  # "tight" when the need is within 10% of the free memory

GATED_ACTIVATIONS = ("silu", "swish", "swiglu")

# Facts config.json does not state, taken from transformers' module code. Explicit config keys
# (attention_bias, mlp_bias, tie_word_embeddings, qk_layernorm) win over these.
_TRAITS: dict[str, dict[str, object]] = {
    "gpt2": {"tied": True, "qkv_bias": True, "o_bias": True, "mlp_bias": True, "positions": True},
    "gpt_neox": {"qkv_bias": True, "o_bias": True, "mlp_bias": True},
    "phi": {"qkv_bias": True, "o_bias": True, "mlp_bias": True, "norms": 1, "head_bias": True},
    "qwen2": {"qkv_bias": True},
    "qwen3": {"qk_norm": True},
    "gemma": {"tied": True, "gated": True},
    "gemma2": {"tied": True, "gated": True, "norms": 4},
    "gemma3_text": {"tied": True, "gated": True, "norms": 4, "qk_norm": True},
}


@dataclass(frozen=True)
class DecoderShape:
    """The numbers of a dense decoder-only transformer, whatever its config calls them."""

    model_type: str
    architecture: str  # e.g. "LlamaForCausalLM"
    vocab_size: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    max_position: int
    tied: bool  # lm_head shares the input embedding
    gated: bool  # MLP has gate + up + down (3 matrices) instead of 2
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    rms_norm: bool  # RMSNorm (weight only) instead of LayerNorm (weight + bias)
    norms_per_layer: int
    qk_norm: bool  # a norm of size head_dim on queries and on keys
    positions: bool  # learned position embeddings (GPT-2)
    head_bias: bool  # lm_head has a bias (Phi)


def decoder_shape(config: dict) -> DecoderShape:
    """Read a config.json dict (GPT-2, Llama, Qwen2, GPT-NeoX, Phi, … attribute names)."""
    config = {**config.get("text_config", {}), **config}
    model_type = str(config.get("model_type", ""))
    traits = _TRAITS.get(model_type, {})
    hidden = int(_first(config, "hidden_size", "n_embd", "d_model"))
    heads = int(_first(config, "num_attention_heads", "n_head", "num_heads"))
    bias = config.get("attention_bias")
    return DecoderShape(
        model_type=model_type,
        architecture=(config.get("architectures") or [model_type])[0],
        vocab_size=int(config["vocab_size"]),
        hidden=hidden,
        layers=int(_first(config, "num_hidden_layers", "n_layer", "num_layers")),
        heads=heads,
        kv_heads=int(_first(config, "num_key_value_heads", "num_kv_heads", default=heads)),
        head_dim=int(_first(config, "head_dim", default=hidden // heads)),
        intermediate=int(_first(config, "intermediate_size", "n_inner", default=4 * hidden)),
        max_position=int(_first(config, "max_position_embeddings", "n_positions", default=0)),
        tied=bool(_first(config, "tie_word_embeddings", default=traits.get("tied", False))),
        gated=bool(traits.get("gated", _activation(config) in GATED_ACTIVATIONS)),
        qkv_bias=bool(bias if bias is not None else traits.get("qkv_bias", False)),
        o_bias=bool(bias if bias is not None else traits.get("o_bias", False)),
        mlp_bias=bool(_first(config, "mlp_bias", default=traits.get("mlp_bias", False))),
        rms_norm="rms_norm_eps" in config,
        norms_per_layer=int(traits.get("norms", 2)),
        qk_norm=bool(_first(config, "qk_layernorm", default=traits.get("qk_norm", False))),
        positions=bool(traits.get("positions", False)),
        head_bias=bool(traits.get("head_bias", False)),
    )


def _first(config: dict, *keys: str, default: object = None) -> object:
    """The first of `keys` set (not None) in `config`, else `default`; KeyError when neither."""
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    if default is None:
        raise KeyError(f"config.json has none of {', '.join(keys)}")
    return default


def _activation(config: dict) -> str:
    return str(_first(config, "hidden_act", "activation_function", default="")).lower()


def linear_parameters(shape: DecoderShape) -> int:
    """Weights of the Linear layers inside the blocks: what quantization shrinks."""
    q_out, kv_out = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    attention = shape.hidden * (2 * q_out + 2 * kv_out)  # q, o + k, v
    mlp = (3 if shape.gated else 2) * shape.hidden * shape.intermediate
    return shape.layers * (attention + mlp)


def other_parameters(shape: DecoderShape) -> int:
    """Everything but the block Linear weights: embeddings, lm_head, biases, norms."""
    norm = shape.hidden if shape.rms_norm else 2 * shape.hidden
    per_layer = shape.norms_per_layer * norm + _bias_parameters(shape)
    if shape.qk_norm:
        per_layer += 2 * (shape.head_dim if shape.rms_norm else 2 * shape.head_dim)
    embeddings = shape.vocab_size * shape.hidden * (1 if shape.tied else 2)
    positions = shape.max_position * shape.hidden if shape.positions else 0
    head_bias = shape.vocab_size if shape.head_bias else 0
    return shape.layers * per_layer + embeddings + positions + norm + head_bias


def _bias_parameters(shape: DecoderShape) -> int:
    q_out, kv_out = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    mlp_out = (2 if shape.gated else 1) * shape.intermediate + shape.hidden
    return (
        shape.qkv_bias * (q_out + 2 * kv_out)
        + shape.o_bias * shape.hidden
        + shape.mlp_bias * mlp_out
    )


def estimate_parameters(config: dict) -> int:
    """Parameter count of the dense decoder described by a config.json dict (tied weights once)."""
    shape = decoder_shape(config)
    return linear_parameters(shape) + other_parameters(shape)


def estimate_memory(config: dict, device_kind: str = "cuda") -> dict[str, int]:
    """Bytes needed to run the model per quantization ({"FP16": …, "Q8": …, "Q4": …, "Q2": …}):
    weights at the option's size plus RUNTIME_OVERHEAD. `device_kind` "cpu" prices the float32
    that CPU loads really use."""
    shape = decoder_shape(config)
    linear, other = linear_parameters(shape), other_parameters(shape)
    per_weight, other_bytes = LINEAR_BYTES[device_kind], OTHER_BYTES[device_kind]
    return {
        q: int((linear * per_weight[q] + other * other_bytes) * (1 + RUNTIME_OVERHEAD))
        for q in QUANTIZATIONS
    }


def fit_label(required: int, device_info: dict) -> tuple[str, str]:
    """(code, label) for `required` bytes against the device's free memory, LM-Studio style:
    "full" below 90% of free, "partial" (tight) within ±10% of free, else "too_large"."""
    free = device_info["free_bytes"]
    where = "on GPU" if device_info["kind"] == "cuda" else "in memory"
    if required <= free * (1 - FIT_MARGIN):
        return "full", f"Fits {where}"
    if required <= free * (1 + FIT_MARGIN):
        return "partial", f"Tight fit {where}"
    return "too_large", "Likely too large"
