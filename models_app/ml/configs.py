"""Read a model's numbers the way transformers does: from its instantiated config, text part first.

Real repos name their sizes in many ways: under `text_config` (Gemma 3, Mistral 3, Qwen-VL,
Llava), computed from a block pattern with `num_hidden_layers: null` (NemotronH), as
`n_embd`/`n_layer` (GPT-2). Instead of a table of spellings we let transformers build its config
object (which resolves aliases, nested configs and computed fields) and read that.

No Django here. Every refusal is a ConfigError whose message says why, for the user.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import transformers
from transformers import PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
)

# Sizes beyond these are not a model anyone can run; refusing them keeps a hostile config.json
# from making us build millions of modules (even on the meta device) or overflow a column.
BOUNDS = {
    "num_hidden_layers": 1024,
    "hidden_size": 131_072,
    "intermediate_size": 1_048_576,
    "vocab_size": 4_194_304,
    "num_attention_heads": 4096,
    "num_key_value_heads": 4096,
    "head_dim": 16_384,
    "num_experts": 4096,
    "num_local_experts": 4096,
    "n_routed_experts": 4096,
}


class ConfigError(ValueError):
    """A config.json miStudio cannot use; the message says why."""


@dataclass(frozen=True)
class ModelShape:
    """The numbers of the text decoder, whatever its config calls them."""

    model_type: str  # the top-level model_type (e.g. "gemma3" for a multimodal Gemma 3)
    architecture: str  # e.g. "LlamaForCausalLM", from `architectures` or the auto class
    vocab_size: int
    hidden: int  # d_model of the residual stream
    layers: int  # decoder blocks
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int  # MLP width (an expert's width in a mixture-of-experts model)
    max_position: int  # 0 when the config does not say
    num_experts: int  # routed experts per MoE layer; 0 for a dense model
    experts_per_token: int  # routed experts each token uses; 0 for a dense model
    multimodal: bool  # the text model sits inside a vision(-audio) model


def config_from_dict(data: object) -> PretrainedConfig:
    """Build transformers' config object from a parsed config.json.

    Raises ConfigError when it is not a JSON object, when its model type needs custom code
    (`auto_map` with a type transformers does not ship: miStudio never runs remote code), when
    transformers does not know the type, or when transformers cannot read the values.
    """
    if not isinstance(data, dict):
        raise ConfigError("config.json is not a JSON object.")
    model_type = data.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise ConfigError(_unknown_type_message(model_type, custom=bool(data.get("auto_map"))))
    try:
        # as AutoConfig reads a file: {"__float__": "Infinity"} objects become floats first
        values = PretrainedConfig._decode_special_floats(dict(data))
        config = CONFIG_MAPPING[model_type].from_dict(values)
    except Exception as exc:  # noqa: BLE001 - any value transformers rejects is the user's input
        raise ConfigError(f"config.json cannot be read by transformers: {_brief(exc)}") from None
    check_bounds(config)
    return config


def _unknown_type_message(model_type: object, *, custom: bool) -> str:
    name = model_type if isinstance(model_type, str) and model_type else "(none)"
    if custom:
        return (
            f"This model needs its own Python code (model type {name!r} with an auto_map in"
            " config.json): transformers can only run it with trust_remote_code, which miStudio"
            " never enables. Use a version of the model that transformers supports natively."
        )
    return (
        f"transformers does not know the model type {name!r}, so it cannot load this model."
        " Upgrading transformers may add it."
    )


def _brief(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:300]


def text_config(config: PretrainedConfig) -> PretrainedConfig:
    """The config of the text decoder (itself for a text-only model)."""
    get = getattr(config, "get_text_config", None)
    return get(decoder=True) if get is not None else config


def auto_model_class(config: PretrainedConfig):
    """The transformers class that loads this config as a model that reads text: a causal LM,
    else an image-text-to-text model (its language model is what we extract from)."""

    model_type = config.model_type
    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type) or (
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.get(model_type)
    )
    if not name or not hasattr(transformers, name):
        raise ConfigError(
            f"{model_type!r} models do not generate text (no causal or image-text-to-text model"
            " class in transformers); miStudio extracts from text models."
        )
    return getattr(transformers, name)


def num_layers(config: PretrainedConfig) -> int:
    """Decoder blocks of the text model: `num_hidden_layers`, else the length of its block pattern
    (`layer_types`); ConfigError when neither is there."""
    text = text_config(config)
    n = getattr(text, "num_hidden_layers", None)
    if n is None:
        n = len(getattr(text, "layer_types", None) or ())
    if not isinstance(n, int) or n <= 0:
        raise ConfigError("config.json gives no number of layers (num_hidden_layers).")
    return n


def _first(config: PretrainedConfig, *names: str, default: int = 0) -> int:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return default


def model_shape(config: PretrainedConfig) -> ModelShape:
    """The text decoder's numbers (see ModelShape)."""
    text = text_config(config)
    hidden = _first(text, "hidden_size", "n_embd", "d_model")
    heads = _first(text, "num_attention_heads", "n_head", "num_heads")
    if hidden <= 0 or heads <= 0:
        raise ConfigError("config.json gives no hidden size or attention heads.")
    architectures = getattr(config, "architectures", None) or [auto_model_class(config).__name__]
    return ModelShape(
        model_type=config.model_type,
        architecture=str(architectures[0]),
        vocab_size=_first(text, "vocab_size"),
        hidden=hidden,
        layers=num_layers(config),
        heads=heads,
        kv_heads=_first(text, "num_key_value_heads", "num_kv_heads", default=heads),
        head_dim=_first(text, "head_dim", default=hidden // heads),
        intermediate=_first(
            text, "intermediate_size", "n_inner", "ffn_hidden_size", default=4 * hidden
        ),
        max_position=_first(text, "max_position_embeddings", "n_positions", "max_seq_len"),
        num_experts=_first(text, "num_local_experts", "num_experts", "n_routed_experts"),
        experts_per_token=_first(text, "num_experts_per_tok", "moe_topk", "top_k"),
        multimodal=text is not config,
    )


def check_bounds(config: PretrainedConfig) -> None:
    """ConfigError for sizes no runnable model has (negative, non-finite or beyond BOUNDS)."""
    for part in {id(c): c for c in (config, text_config(config))}.values():
        for name, limit in BOUNDS.items():
            value = getattr(part, name, None)
            if value is None or isinstance(value, bool):
                continue
            finite = isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))
            if not finite:
                raise ConfigError(f"config.json: {name} is not a number ({value!r}).")
            if not 0 < value <= limit:
                digits = len(str(value))
                shown = value if digits < 30 else f"{str(value)[:12]}… ({digits} digits)"
                raise ConfigError(f"config.json: {name} = {shown} is outside 1…{limit}.")
