"""Parameter count and memory per quantization from config.json alone, before any download.

The model is built on the meta device (no memory, no weights) from the config by transformers
itself, so every architecture transformers ships is counted exactly: mixture-of-experts models
with all their experts (and shared experts), multimodal models with their vision tower, hybrids.
Parameters are then split by what each quantization shrinks:

    linear   weights of Linear layers (bitsandbytes / optimum-quanto quantize these)
    experts  fused expert weights, (E, out, in) per layer (quantized expert by expert, see
             experts.py; bitsandbytes alone would leave them 16-bit)
    other    embeddings, lm_head, norms, biases, convolutions (kept 16-bit, 32-bit on CPU)

Memory = Σ parameters × bytes per weight of their kind at the option, + RUNTIME_OVERHEAD.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn

from .configs import ConfigError, ModelShape, auto_model_class, config_from_dict, model_shape
from .loading import QUANTIZATIONS

# Bytes per quantized weight. Q8 int8 (+ a row scale), NF4 with double quant ≈0.52, quanto int2
# with a 16-bit scale and shift per group of 128 ≈0.28 (float32 scales on CPU ≈0.32). On CPU the
# FP16 option really runs in float32. Experts use optimum-quanto at every option (int8/int4/int2).
LINEAR_BYTES = {
    "cuda": {"FP16": 2.0, "Q8": 1.0, "Q4": 0.52, "Q2": 0.28},
    "cpu": {"FP16": 4.0, "Q8": 1.0, "Q4": 0.52, "Q2": 0.32},
}
EXPERT_BYTES = {
    "cuda": {"FP16": 2.0, "Q8": 1.03, "Q4": 0.53, "Q2": 0.28},
    "cpu": {"FP16": 4.0, "Q8": 1.06, "Q4": 0.56, "Q2": 0.32},
}
OTHER_BYTES = {"cuda": 2, "cpu": 4}  # embeddings, lm_head, norms, biases
PARAMS_MAX = 10**15  # a quadrillion: far beyond any model; keeps byte counts inside int64
RUNTIME_OVERHEAD = 0.20  # activations, KV cache, allocator slack on top of the weights
FIT_MARGIN = 0.10  # "tight" when the need is within 10% of the free memory


@dataclass(frozen=True)
class ParameterCounts:
    """Parameters of the model a config describes (tied weights counted once)."""

    total: int
    linear: int  # Linear weights (quantizable)
    experts: int  # fused (E, out, in) expert weights (quantizable, expert by expert)
    other: int  # everything else, kept at 16/32 bit
    active: int  # used per token: total minus the routed experts a token skips
    language_model: int  # the text decoder (all but vision/audio towers and projectors)
    shape: ModelShape

    def to_dict(self) -> dict:
        return {
            "total": self.total,
            "active": self.active,
            "language_model": self.language_model,
            "experts": self.experts,
            "num_experts": self.shape.num_experts,
            "experts_per_token": self.shape.experts_per_token,
        }


def is_expert_weight(module: nn.Module, parameter: nn.Parameter) -> bool:
    """A fused expert weight: a 3-D parameter (E, out, in) of an *Experts module."""
    return parameter.ndim == 3 and "Experts" in type(module).__name__


def meta_model(config: dict) -> nn.Module:
    """The model a config.json dict describes, built by transformers on the meta device: every
    module and parameter shape, no memory. ConfigError when transformers cannot build it."""
    built = config_from_dict(config)
    cls = auto_model_class(built)
    with torch.device("meta"):
        try:
            return cls._from_config(built)
        except Exception as exc:  # noqa: BLE001 - a config transformers reads but cannot build
            raise ConfigError(f"transformers cannot build this model: {exc}"[:400]) from None


@lru_cache(maxsize=64)
def _meta_counts(config_json: str) -> tuple[int, int, int, int, int]:
    return _split(meta_model(json.loads(config_json)))


def _split(model: nn.Module) -> tuple[int, int, int, int, int]:
    """(total, linear, experts, other, language model) parameter counts of a built model. The
    output head counts as `other`: bitsandbytes and optimum-quanto keep it unquantized."""
    head = model.get_output_embeddings()
    seen: set[int] = set()
    linear = experts = other = 0
    for module in model.modules():
        for parameter in module.parameters(recurse=False):
            if id(parameter) in seen:
                continue
            seen.add(id(parameter))
            if isinstance(module, nn.Linear) and parameter is module.weight and module is not head:
                linear += parameter.numel()
            elif is_expert_weight(module, parameter):
                experts += parameter.numel()
            else:
                other += parameter.numel()
    decoder = _decoder(model)
    language = sum(p.numel() for p in decoder.parameters()) if decoder is not None else 0
    return linear + experts + other, linear, experts, other, language


def _decoder(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_decoder", None)
    try:
        return get() if get is not None else None
    except (AttributeError, NotImplementedError, ValueError):
        return None


def count_parameters(config: dict) -> ParameterCounts:
    """Exact parameter counts of the model `config` (a parsed config.json) describes.

    Raises ConfigError (a ValueError) when transformers cannot build it (see configs.py)."""
    config_json = json.dumps(config, sort_keys=True, default=str)
    total, linear, experts, other, language = _meta_counts(config_json)
    if total > PARAMS_MAX:
        raise ConfigError(f"config.json describes {total:.3g} parameters; more than any model.")
    shape = model_shape(config_from_dict(config))
    active = total
    if experts and shape.num_experts and shape.experts_per_token:
        used = min(shape.experts_per_token, shape.num_experts) / shape.num_experts
        active = total - int(experts * (1 - used))
    return ParameterCounts(total, linear, experts, other, active, language or total, shape)


def estimate_parameters(config: dict) -> int:
    """Parameter count of the model a config.json dict describes (tied weights once)."""
    return count_parameters(config).total


def memory_for(counts: ParameterCounts, device_kind: str = "cuda") -> dict[str, int]:
    """Bytes needed to run the model per quantization ({"FP16": …, "Q8": …, "Q4": …, "Q2": …}):
    weights at the option's size plus RUNTIME_OVERHEAD. `device_kind` "cpu" prices the float32
    that CPU loads really use."""
    linear, experts = LINEAR_BYTES[device_kind], EXPERT_BYTES[device_kind]
    other = counts.other * OTHER_BYTES[device_kind]
    return {
        q: int(
            (counts.linear * linear[q] + counts.experts * experts[q] + other)
            * (1 + RUNTIME_OVERHEAD)
        )
        for q in QUANTIZATIONS
    }


def estimate_memory(config: dict, device_kind: str = "cuda") -> dict[str, int]:
    """memory_for() of a config.json dict."""
    return memory_for(count_parameters(config), device_kind)


def rough_memory(params: int, device_kind: str = "cuda") -> dict[str, int]:
    """Bytes per quantization from a parameter count alone (a search result, no config): every
    weight at the option's Linear size, + RUNTIME_OVERHEAD. Coarser than memory_for."""
    per_weight = LINEAR_BYTES[device_kind]
    return {q: int(params * per_weight[q] * (1 + RUNTIME_OVERHEAD)) for q in QUANTIZATIONS}


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
