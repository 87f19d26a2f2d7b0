"""Load a local Hugging Face snapshot at FP16 / Q8 / Q4 / Q2 and prove the quantization happened.

Every quantization has a chain of backends (`BACKENDS`). The first backend whose one-layer smoke
test passes on the device loads the model, so a device without bitsandbytes kernels (Jetson Orin
sm_87, bitsandbytes #1930: the import works, the first kernel fails) falls back to optimum-quanto
with a notice instead of crashing mid-job. After loading, the quantized layers are counted and the
stored bytes measured; a quantized option that quantized nothing raises QuantizationError.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn

from .configs import auto_model_class, config_from_dict
from .experts import EXPERT_QTYPES, count_quantized_experts, expert_parameters, quantize_experts
from .extensions import extensions_load
from .filecheck import snapshot_check

QUANTIZATIONS = ("FP16", "Q8", "Q4", "Q2")
SMOKE_SIZE = 64  # features of the smoke-test layer
# Max relative error of its output on Gaussian weights. Measured: int8 0.004, nf4 0.09, int2 0.51;
# an all-zero output scores 1.0 and an unrelated one ≈1.4.
SMOKE_TOLERANCE = 0.8


class QuantizationError(RuntimeError):
    """A quantized load that could not run, or that produced a model which is not quantized."""


@dataclass
class LoadReport:
    """What `load_model` really did."""

    quantization: str  # what was asked: FP16 / Q8 / Q4 / Q2
    backend: str  # what did it: torch, bitsandbytes-int8, bitsandbytes-nf4, quanto-int2, ...
    compute_dtype: str  # dtype of activations and of the weights left unquantized, e.g. "float32"
    device: str  # "cpu", "cuda", "cuda:1"
    footprint_bytes: int  # weights + buffers as stored (packed data + scales), see weights_nbytes
    quantized_layers: int  # Linear-like layers holding quantized weights
    linear_layers: int  # Linear-like layers in total (nn.Linear and its subclasses, GPT-2 Conv1D)
    notice: str = ""  # fallback or conversion message for the user; "" when there is none
    load_seconds: float = 0.0
    quantized_experts: int = 0  # fused MoE expert weights quantized expert by expert
    expert_weights: int = 0  # fused MoE expert weights in total


# A backend's load returns the model and a note for the user ("" when there is nothing to say).
LoadFn = Callable[[Path, torch.device, torch.dtype], tuple[nn.Module, str]]
LayerFn = Callable[[nn.Linear, torch.device, torch.dtype], nn.Module]


@dataclass(frozen=True)
class Backend:
    """One way to produce a quantization: load a model, or quantize one layer for the smoke test."""

    name: str  # reported as LoadReport.backend
    load: LoadFn
    quantize_layer: LayerFn


# ---------------------------------------------------------------------------------------------
# Quiet the two bitsandbytes log lines that are noise for us (logging filters, nothing global):
# on CPU every int8 matmul logs "inputs will be cast from float32 to float16" (once per layer per
# forward), and the import logs that the optional hub kernel package `kernels` is missing.


class _DropMessages(logging.Filter):
    def __init__(self, *prefixes: str) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


logging.getLogger("bitsandbytes.autograd._functions").addFilter(
    _DropMessages("MatMul8bitLt: inputs will be cast")
)
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    _DropMessages("Failed to load CPU gemm_4bit_forward from kernels-community")
)


# ---------------------------------------------------------------------------------------------
# Public API


def load_model(
    path: str | Path,
    quantization: str,
    device: torch.device,
    backends: Sequence[Backend] | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[nn.Module, LoadReport]:
    """Load the safetensors snapshot in folder `path` at `quantization` on `device`.

    `backends` overrides the chain tried for this quantization (default `BACKENDS[quantization]`);
    `dtype` the compute dtype (default `compute_dtype(device)`; bfloat16 is an option on CUDA).
    Returns the model (eval mode, no gradients) and a LoadReport of what really happened.
    Raises ValueError for an unknown quantization or a folder without config.json / safetensors,
    QuantizationError when no backend runs on the device or the result is not quantized.
    """
    quantization = check_quantization(quantization)
    folder = _check_snapshot(Path(path))
    start = time.perf_counter()
    backend, fallback = _choose_backend(quantization, device, backends or BACKENDS[quantization])
    dtype = dtype or compute_dtype(device)
    model, note = backend.load(folder, device, dtype)
    model.eval().requires_grad_(False)
    experts_note = _quantize_experts(model, quantization, dtype)
    if quantization != "FP16":
        _verify_quantized(model, quantization, backend.name)
    quantized, linear = count_linear_layers(model)
    stacks, expert_weights = count_quantized_experts(model)
    notes = (fallback, note, experts_note, _dtype_note(quantization, dtype))
    seconds = round(time.perf_counter() - start, 3)
    return model, LoadReport(
        quantization, backend.name, dtype_name(dtype), str(device), weights_nbytes(model),
        quantized, linear, " ".join(n for n in notes if n), seconds, stacks, expert_weights,
    )  # fmt: skip


def _quantize_experts(model: nn.Module, quantization: str, dtype: torch.dtype) -> str:
    """Quantize fused MoE expert weights (the backends skip them); a note when it happened."""
    stacks = quantize_experts(model, quantization, dtype)
    if not stacks:
        return ""
    qtype = EXPERT_QTYPES[quantization]
    return (
        f"Mixture-of-experts weights ({stacks} fused tensors) quantized expert by expert with"
        f" optimum-quanto {qtype[1:]}; the experts run one at a time."
    )


def check_quantization(quantization: str) -> str:
    """The quantization in canonical upper case; ValueError when it is not one of QUANTIZATIONS."""
    value = str(quantization).strip().upper()
    if value not in QUANTIZATIONS:
        raise ValueError(
            f"unknown quantization {quantization!r}: choose one of {', '.join(QUANTIZATIONS)}"
        )
    return value


def compute_dtype(device: torch.device) -> torch.dtype:
    """float16 on CUDA; float32 on CPU, where a float16/bfloat16 forward is ~100× slower."""
    return torch.float16 if device.type == "cuda" else torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def backend_smoke_test(
    device: torch.device, quantization: str, backend: Backend | None = None
) -> str | None:
    """Run a one-layer quantized forward with `backend` (default: first choice for `quantization`).

    Returns None when the layer works on `device`, else the reason (one line). The result is
    cached per (backend name, device) for the life of the process.
    """
    backend = backend or BACKENDS[check_quantization(quantization)][0]
    key = (backend.name, str(device))
    if key not in _SMOKE_RESULTS:
        _SMOKE_RESULTS[key] = _smoke_error(backend, device)
    return _SMOKE_RESULTS[key]


_SMOKE_RESULTS: dict[tuple[str, str], str | None] = {}


def weights_nbytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers as stored, each storage counted once.

    Counts packed quantized data and its scales: bitsandbytes keeps them on the parameter (`SCB`,
    `quant_state.absmax`, nested double-quant state), optimum-quanto in inner tensors of a tensor
    subclass. (`get_memory_footprint()` reports quanto models at their float size.)
    """
    sizes: dict[tuple, int] = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        for stored in _stored_tensors(tensor):
            storage = stored.untyped_storage()
            key = (str(stored.device), storage.data_ptr() or id(stored))
            sizes[key] = max(sizes.get(key, 0), storage.nbytes())
    return sum(sizes.values())


def count_linear_layers(model: nn.Module) -> tuple[int, int]:
    """(quantized Linear-like layers, all Linear-like layers) in `model`."""
    layers = [m for m in model.modules() if is_linear_like(m)]
    return sum(is_quantized(m) for m in layers), len(layers)


def is_linear_like(module: nn.Module) -> bool:
    """nn.Linear and its subclasses (bitsandbytes, quanto) and transformers' Conv1D (GPT-2)."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def is_quantized(module: nn.Module) -> bool:
    """True for a bitsandbytes layer holding int8 / packed 4-bit data or a frozen quanto layer."""
    # A layer from a library that was never imported cannot exist: look only in sys.modules.
    quanto_nn = sys.modules.get("optimum.quanto.nn")
    if quanto_nn is not None and isinstance(module, quanto_nn.QModuleMixin):
        return module.frozen
    bnb = sys.modules.get("bitsandbytes")
    if bnb is not None and isinstance(module, bnb.nn.Linear8bitLt | bnb.nn.Linear4bit):
        return module.weight.dtype in (torch.int8, torch.uint8)
    return False


def conv1d_to_linear(model: nn.Module) -> int:
    """Replace every transformers Conv1D in `model` by an equal nn.Linear; returns how many.

    Conv1D stores its weight as (in, out) and computes x @ W + b; nn.Linear stores (out, in).
    Each replacement is checked numerically against the original layer.
    """
    targets = [(n, m) for n, m in model.named_modules() if type(m).__name__ == "Conv1D"]
    for name, conv in targets:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, _linear_from_conv1d(conv))
    return len(targets)


# ---------------------------------------------------------------------------------------------
# Loading


def _check_snapshot(folder: Path) -> Path:
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} is not a model snapshot: config.json is missing")
    if not any(folder.glob("*.safetensors")):
        raise ValueError(f"{folder} has no .safetensors weights (pickle weights are not loaded)")
    snapshot_check(folder)  # a hostile header or tokenizer file ends here, named
    return folder


def _from_pretrained(
    folder: Path, dtype: torch.dtype, device: torch.device | None, quantization_config=None
) -> nn.Module:
    """The model in `folder` on `device`; None loads to CPU without a device map, for a model
    that is moved later (a stale `hf_device_map` would name the wrong device). The class is the
    one configs.auto_model_class picks: a causal LM, or an image-text-to-text model whose
    language model is extracted."""
    config = config_from_dict(json.loads((folder / "config.json").read_text()))
    return auto_model_class(config).from_pretrained(
        folder,
        dtype=dtype,
        device_map=None if device is None else {"": device},
        quantization_config=quantization_config,
        use_safetensors=True,
        trust_remote_code=False,
        low_cpu_mem_usage=True,
        local_files_only=True,
    )


def _load_torch(folder: Path, device: torch.device, dtype: torch.dtype) -> tuple[nn.Module, str]:
    return _from_pretrained(folder, dtype, device), ""


def _load_bitsandbytes(
    mode: str, folder: Path, device: torch.device, dtype: torch.dtype
) -> tuple[nn.Module, str]:
    import bitsandbytes  # noqa: F401  (fail here, clearly, when the library is missing)
    from transformers import BitsAndBytesConfig

    if mode == "int8":
        config = BitsAndBytesConfig(load_in_8bit=True)
    else:
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    return _from_pretrained(folder, dtype, device, config), ""


def _load_quanto(
    qtype: str, folder: Path, device: torch.device, dtype: torch.dtype
) -> tuple[nn.Module, str]:
    from optimum.quanto import quantize

    extensions_load()  # the built library, without torch's JIT lock (see extensions.py)
    model = _from_pretrained(folder, dtype, None)
    converted = conv1d_to_linear(model)  # quanto quantizes nn.Linear only
    quantize(model, weights=qtype, exclude=_output_head_names(model))
    _freeze_on(model, device)
    note = f"Converted {converted} Conv1D layers to Linear for {qtype}." if converted else ""
    return model, note


def _output_head_names(model: nn.Module) -> list[str]:
    """Module names of the output embedding (lm_head), kept unquantized like bitsandbytes does."""
    head = model.get_output_embeddings()
    return [name for name, module in model.named_modules() if head is not None and module is head]


def _freeze_on(model: nn.Module, device: torch.device) -> None:
    """Quantize each quanto layer on `device`, one at a time, so the GPU never holds the whole
    16-bit model; then move the rest of the model there."""
    from optimum.quanto.nn import QModuleMixin

    for module in model.modules():
        if isinstance(module, QModuleMixin):
            module.to(device)
            module.freeze()
    model.to(device)


def _linear_from_conv1d(conv: nn.Module) -> nn.Linear:
    n_in, n_out = conv.weight.shape  # Conv1D weight: (in, out)
    linear = nn.Linear(n_in, n_out, bias=conv.bias is not None, device="meta")
    linear.weight = nn.Parameter(conv.weight.detach().T.contiguous(), requires_grad=False)
    if conv.bias is not None:
        linear.bias = nn.Parameter(conv.bias.detach(), requires_grad=False)
    _check_same_output(conv, linear)
    return linear


def _check_same_output(reference: nn.Module, candidate: nn.Module) -> None:
    weight = reference.weight
    x = torch.randn(2, weight.shape[0], device=weight.device, dtype=weight.dtype)  # (2, in)
    with torch.no_grad():
        expected, got = reference(x), candidate(x)  # (2, out)
    if not torch.allclose(expected.float(), got.float(), rtol=1e-2, atol=1e-3):
        raise QuantizationError("Conv1D → Linear conversion changed the layer's output")


def _verify_quantized(model: nn.Module, quantization: str, backend: str) -> None:
    """Raise QuantizationError unless most Linear-like layers (lm_head aside) and every fused
    expert weight are quantized."""
    left = [f"{type(m).__name__}.{name}" for m, name, _ in expert_parameters(model)]
    if left:
        raise QuantizationError(
            f"{quantization} left {len(left)} mixture-of-experts weights unquantized"
            f" ({', '.join(left[:2])}…); refusing to report {quantization} for them"
        )
    head = model.get_output_embeddings()
    layers = [(n, m) for n, m in model.named_modules() if is_linear_like(m) and m is not head]
    plain = [name for name, module in layers if not is_quantized(module)]
    done = len(layers) - len(plain)
    if done == 0 or len(plain) > done:
        raise QuantizationError(
            f"{quantization} via {backend} quantized {done} of {len(layers)} Linear layers "
            f"(left as float: {', '.join(plain[:3])}…); refusing to report {quantization} for "
            "a model that is not quantized"
        )


def _dtype_note(quantization: str, dtype: torch.dtype) -> str:
    if quantization == "FP16" and dtype == torch.float32:
        return "FP16 runs as float32 on CPU (a float16 forward is ~100× slower there)."
    return ""


# ---------------------------------------------------------------------------------------------
# Footprint


def _stored_tensors(tensor: torch.Tensor) -> Iterator[torch.Tensor]:
    """The plain tensors that hold `tensor`'s data: inner tensors of wrapper subclasses
    (optimum-quanto, recursively) and the scales bitsandbytes attaches to its parameters."""
    if hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        for name in names:
            yield from _stored_tensors(getattr(tensor, name))
        return
    yield tensor
    for value in vars(tensor).values():  # Int8Params.SCB / .CB, Params4bit.quant_state
        yield from _attached_tensors(value)


def _attached_tensors(value: object) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield from _stored_tensors(value)
    elif type(value).__name__ == "QuantState":  # bitsandbytes: absmax, code, nested state2
        for inner in vars(value).values():
            yield from _attached_tensors(inner)


# ---------------------------------------------------------------------------------------------
# Smoke test and backend choice


def _smoke_error(backend: Backend, device: torch.device) -> str | None:
    try:
        _smoke_forward(backend, device, compute_dtype(device))
    except Exception as exc:  # any failure (import, missing kernel, bad numbers) → try another
        return f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    return None


def _smoke_forward(backend: Backend, device: torch.device, dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(SMOKE_SIZE, SMOKE_SIZE, generator=generator) / SMOKE_SIZE**0.5
    x = torch.randn(4, SMOKE_SIZE, generator=generator)  # (4, in)
    layer = nn.Linear(SMOKE_SIZE, SMOKE_SIZE, bias=False)
    layer.weight = nn.Parameter(weight.clone(), requires_grad=False)
    expected = x @ weight.T  # (4, out)
    with torch.no_grad():
        got = backend.quantize_layer(layer, device, dtype)(x.to(device, dtype)).float().cpu()
    error = float((got - expected).norm() / expected.norm())
    if got.shape != expected.shape or not error < SMOKE_TOLERANCE:
        raise QuantizationError(f"{backend.name} gave wrong output (relative error {error:.2f})")


def _choose_backend(
    quantization: str, device: torch.device, chain: Sequence[Backend]
) -> tuple[Backend, str]:
    """The first backend in `chain` that passes its smoke test, and a notice naming those that
    failed ("" when the first choice works)."""
    failures: list[str] = []
    for backend in chain:
        reason = backend_smoke_test(device, quantization, backend)
        if reason is None:
            return backend, _fallback_notice(failures, backend, device)
        failures.append(f"{backend.name} failed its smoke test on {device} ({reason})")
    raise QuantizationError(f"no backend can run {quantization} here: " + "; ".join(failures))


def _fallback_notice(failures: list[str], backend: Backend, device: torch.device) -> str:
    if not failures:
        return ""
    return "; ".join(failures) + f"; loaded with {backend.name} instead."


def _plain_layer(layer: nn.Linear, device: torch.device, dtype: torch.dtype) -> nn.Module:
    return layer.to(device, dtype)


def _bnb_int8_layer(layer: nn.Linear, device: torch.device, dtype: torch.dtype) -> nn.Module:
    import bitsandbytes as bnb

    n_out, n_in = layer.weight.shape
    quantized = bnb.nn.Linear8bitLt(n_in, n_out, bias=False, has_fp16_weights=False)
    quantized.weight = bnb.nn.Int8Params(
        layer.weight.detach().to(dtype), requires_grad=False, has_fp16_weights=False
    )
    return quantized.to(device)  # bitsandbytes quantizes on the move to the device


def _bnb_nf4_layer(layer: nn.Linear, device: torch.device, dtype: torch.dtype) -> nn.Module:
    import bitsandbytes as bnb

    n_out, n_in = layer.weight.shape
    quantized = bnb.nn.Linear4bit(
        n_in, n_out, bias=False, compute_dtype=dtype, compress_statistics=True, quant_type="nf4"
    )
    quantized.weight = bnb.nn.Params4bit(
        layer.weight.detach().to(dtype),
        requires_grad=False,
        quant_type="nf4",
        compress_statistics=True,
    )
    return quantized.to(device)


def _quanto_layer(
    qtype: str, layer: nn.Linear, device: torch.device, dtype: torch.dtype
) -> nn.Module:
    from optimum.quanto import quantize

    extensions_load()
    wrapper = nn.Sequential(layer.to(dtype))
    quantize(wrapper, weights=qtype)
    _freeze_on(wrapper, device)
    return wrapper


TORCH = Backend("torch", _load_torch, _plain_layer)
BNB_INT8 = Backend("bitsandbytes-int8", partial(_load_bitsandbytes, "int8"), _bnb_int8_layer)
BNB_NF4 = Backend("bitsandbytes-nf4", partial(_load_bitsandbytes, "nf4"), _bnb_nf4_layer)


def _quanto_backend(qtype: str) -> Backend:
    return Backend(
        f"quanto-{qtype[1:]}", partial(_load_quanto, qtype), partial(_quanto_layer, qtype)
    )


QUANTO_INT8, QUANTO_INT4, QUANTO_INT2 = map(_quanto_backend, ("qint8", "qint4", "qint2"))

# Backends tried in order for each quantization; replace an entry to swap a library out.
BACKENDS: dict[str, tuple[Backend, ...]] = {
    "FP16": (TORCH,),
    "Q8": (BNB_INT8, QUANTO_INT8),
    "Q4": (BNB_NF4, QUANTO_INT4),
    "Q2": (QUANTO_INT2,),
}
