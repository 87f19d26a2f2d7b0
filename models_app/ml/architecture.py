"""Describe a model's architecture for the UI and the API, from its config and its real modules."""

from __future__ import annotations

import math

from torch import nn

from .configs import ModelShape, model_shape
from .estimate import meta_model
from .layers import find_blocks
from .loading import is_linear_like

MLP_NAMES = ("mlp", "feed_forward", "ffn")  # child names of a block's MLP besides *MLP classes


def describe(model: nn.Module) -> dict:
    """Architecture of a loaded model: block count, widths, real parameter count, one entry per
    layer (embedding, blocks, final norm, output) and a config summary.

    Block MLP sizes come from the block's real Linear-like modules (logical in/out features, so a
    packed 4-bit weight reports its true shape); `parameters` counts quantized weights logically.
    """
    shape = model_shape(model.config)
    path, blocks = find_blocks(model)
    entries = [
        _embedding_entry(model),
        *(_block_entry(i, block, shape) for i, block in enumerate(blocks)),
        _final_norm_entry(model, blocks, shape.hidden),
        _output_entry(model),
    ]
    return _summary(shape, count_parameters(model), len(blocks), entries)


def describe_config(config: dict) -> dict:
    """The same description before download, from a config.json dict: the model is built on
    the meta device (shapes, no memory) and described like a loaded one."""
    return describe(meta_model(config))


def count_parameters(model: nn.Module) -> int:
    """Parameters by logical shape (a packed 4-bit weight counts as its unpacked size)."""
    return sum(logical_numel(p) for p in model.parameters())


def logical_numel(parameter: nn.Parameter) -> int:
    state = getattr(parameter, "quant_state", None)  # bitsandbytes Params4bit packs 2 per byte
    if state is not None and getattr(state, "shape", None) is not None:
        return math.prod(state.shape)
    return parameter.numel()  # quanto tensors and Int8Params already have the logical shape


def _summary(shape: ModelShape, parameters: int, n_blocks: int, entries: list) -> dict:
    layers = [{"index": i, **entry} for i, entry in enumerate(e for e in entries if e)]
    return {
        "total_layers": n_blocks,
        "hidden_dimension": shape.hidden,
        "attention_heads": shape.heads,
        "kv_heads": shape.kv_heads,
        "parameters": int(parameters),
        "layers": layers,
        "config": {
            "vocab_size": shape.vocab_size,
            "max_position": shape.max_position,
            "mlp_ratio": round(shape.intermediate / shape.hidden, 4),
            "architecture": shape.architecture,
            "model_type": shape.model_type,
            "num_experts": shape.num_experts,
            "experts_per_token": shape.experts_per_token,
            "multimodal": shape.multimodal,
        },
    }


def _embedding_entry(model: nn.Module) -> dict | None:
    embedding = model.get_input_embeddings()
    if embedding is None:
        return None
    vocab, dim = embedding.weight.shape  # (V, d)
    return {"type": "Embedding", "detail": f"Shape: {vocab} × {dim}"}


def _block_entry(index: int, block: nn.Module, shape: ModelShape) -> dict:
    detail = _block_detail(shape, _mlp_dims(block))
    if shape.num_experts and any("Experts" in type(m).__name__ for m in block.modules()):
        top = f", {shape.experts_per_token} per token" if shape.experts_per_token else ""
        detail += f" | MoE: {shape.num_experts} experts{top}"
    return {"type": f"TransformerBlock_{index}", "detail": detail}


def _block_detail(shape: ModelShape, mlp: tuple[int, int, int] | None) -> str:
    attention = f"Attention: {shape.heads} heads × {shape.head_dim} dims"
    if shape.kv_heads != shape.heads:
        attention += f" ({shape.kv_heads} KV heads)"
    if mlp is None:
        return attention
    return f"{attention} | MLP: {mlp[0]} → {mlp[1]} → {mlp[2]}"


def _mlp_dims(block: nn.Module) -> tuple[int, int, int] | None:
    """(in, hidden, out) of the block's MLP from its first and last Linear-like layers."""
    mlp = _mlp_module(block)
    inside_experts = {
        id(inner)
        for m in (mlp.modules() if mlp is not None else ())
        if "Experts" in type(m).__name__
        for inner in m.modules()
    }  # per-expert layers of a quantized MoE stack are not the block's MLP
    linears = [
        m for m in (mlp.modules() if mlp is not None else ())
        if is_linear_like(m) and id(m) not in inside_experts
    ]  # fmt: skip
    if len(linears) < 2:
        return None
    (first_in, first_out), (_, last_out) = in_out_features(linears[0]), in_out_features(linears[-1])
    return first_in, first_out, last_out


def _mlp_module(block: nn.Module) -> nn.Module | None:
    for name, child in block.named_children():
        if name in MLP_NAMES or "MLP" in type(child).__name__:
            return child
    return None


def in_out_features(module: nn.Module) -> tuple[int, int]:
    """(in, out) features of a Linear-like layer: its logical sizes, not a packed weight's."""
    if hasattr(module, "in_features"):  # nn.Linear, bitsandbytes, quanto QLinear
        return module.in_features, module.out_features
    n_in, n_out = module.weight.shape  # transformers Conv1D stores (in, out)
    return n_in, n_out


def _final_norm_entry(model: nn.Module, blocks: nn.ModuleList, hidden: int) -> dict | None:
    """The first *Norm module registered after the blocks in the block list's parent."""
    parent = next(m for m in model.modules() if any(c is blocks for c in m.children()))
    children = list(parent.children())
    after = children[next(i for i, c in enumerate(children) if c is blocks) + 1 :]
    norm = next((c for c in after if "Norm" in type(c).__name__), None)
    if norm is None:
        return None
    weight = getattr(norm, "weight", None)  # a norm without affine weight has none
    dim = weight.shape[0] if weight is not None else hidden
    return {"type": type(norm).__name__, "detail": f"Dim: {dim}"}


def _output_entry(model: nn.Module) -> dict | None:
    head = model.get_output_embeddings()
    if head is None:
        return None
    n_in, n_out = in_out_features(head)
    embedding = model.get_input_embeddings()
    tied = embedding is not None and head.weight is embedding.weight
    return {"type": "Output", "detail": _output_detail(n_in, n_out, tied)}


def _output_detail(n_in: int, n_out: int, tied: bool) -> str:
    return f"Shape: {n_in} × {n_out}" + (" (tied to the embedding)" if tied else "")
