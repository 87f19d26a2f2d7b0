"""Quantize the fused expert weights of mixture-of-experts models, expert by expert.

transformers 5 stores a MoE layer's experts as 3-D parameters, `gate_up_proj` (E, 2·I, d) and
`down_proj` (E, d, I), in an `*Experts` module. bitsandbytes and optimum-quanto quantize
`nn.Linear` modules only, so a "Q4" Mixtral would keep ~90% of its weights at 16 bits. Here each
(E, a, b) parameter is replaced by a QuantizedExperts stack: E optimum-quanto layers (int8, int4
or int2 to match the option), one per expert. The experts' eager forward reads one expert at a
time (`self.gate_up_proj[e]`, `self.down_proj[e]`), and the stack answers `stack[e]` with that
expert's weight dequantized to the compute dtype — the same matrix, at the option's precision.

No Django here.
"""

from __future__ import annotations

import torch
from torch import nn

from .extensions import extensions_load

# optimum-quanto weight type per miStudio option (FP16 keeps the experts as they are).
EXPERT_QTYPES = {"Q8": "qint8", "Q4": "qint4", "Q2": "qint2"}


class QuantizedExperts(nn.Module):
    """E quantized (a, b) matrices standing in for an (E, a, b) expert parameter.

    `stack[e]` (an int or a 0-d tensor) → the (a, b) weight of expert e in `dtype`; `shape`,
    `dtype` and `device` describe the parameter it replaces, so code that reads them still works.
    """

    def __init__(self, weight: torch.Tensor, qtype: str, dtype: torch.dtype):
        super().__init__()
        from optimum.quanto import freeze, quantize

        self.full_shape = tuple(weight.shape)  # (E, a, b)
        self.compute_dtype = dtype
        layers = []
        for e in range(weight.shape[0]):
            layer = nn.Linear(weight.shape[2], weight.shape[1], bias=False, device=weight.device)
            layer.weight = nn.Parameter(weight[e].detach().to(dtype), requires_grad=False)
            layers.append(layer)
        self.experts = nn.ModuleList(layers)
        quantize(self.experts, weights=qtype)
        freeze(self.experts)

    def __getitem__(self, index) -> torch.Tensor:
        return self.experts[int(index)].weight.dequantize().to(self.compute_dtype)  # (a, b)

    def __len__(self) -> int:
        return self.full_shape[0]

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self.full_shape)

    @property
    def dtype(self) -> torch.dtype:
        return self.compute_dtype

    @property
    def device(self) -> torch.device:
        return self.experts[0].weight.device

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def extra_repr(self) -> str:
        return f"shape={self.full_shape}, dtype={self.compute_dtype}"


def expert_parameters(model: nn.Module) -> list[tuple[nn.Module, str, nn.Parameter]]:
    """(module, name, parameter) of every fused expert weight: a 3-D parameter of an *Experts
    module (conv kernels and other 3-D parameters elsewhere are not experts)."""
    found = []
    for module in model.modules():
        if "Experts" not in type(module).__name__:
            continue
        for name, parameter in module.named_parameters(recurse=False):
            if parameter.ndim == 3:
                found.append((module, name, parameter))
    return found


def quantize_experts(model: nn.Module, quantization: str, dtype: torch.dtype) -> int:
    """Replace every fused expert weight of `model` by a QuantizedExperts stack at
    `quantization` (Q8/Q4/Q2), on the device it is on; returns how many were replaced.

    The experts then run their eager forward (one expert at a time), the one that reads
    `weight[e]`; ValueError when the model cannot switch to it."""
    qtype = EXPERT_QTYPES.get(quantization)
    targets = expert_parameters(model) if qtype else []
    if not targets:
        return 0
    extensions_load()  # the built library, without torch's JIT lock (see extensions.py)
    _use_eager_experts(model)
    for module, name, parameter in targets:
        stack = QuantizedExperts(parameter.data, qtype, dtype)
        del module._parameters[name]
        module.add_module(name, stack)
        del parameter
    return len(targets)


def _use_eager_experts(model: nn.Module) -> None:
    setter = getattr(model, "set_experts_implementation", None)
    if setter is None:
        raise ValueError(f"{type(model).__name__} cannot run its experts one at a time")
    setter("eager")


def count_quantized_experts(model: nn.Module) -> tuple[int, int]:
    """(quantized expert stacks, all fused expert weights) in `model`."""
    stacks = sum(isinstance(m, QuantizedExperts) for m in model.modules())
    return stacks, stacks + len(expert_parameters(model))
