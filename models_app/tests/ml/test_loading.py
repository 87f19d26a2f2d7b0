"""Loading tiny real models at FP16 / Q8 / Q4 / Q2 on CPU: real bitsandbytes and optimum-quanto."""

from __future__ import annotations

from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from optimum.quanto import QLinear, qint2
from torch import nn
from transformers.pytorch_utils import Conv1D

from mistudio.testing.tiny_models import build_pickle_only_repo, build_tiny_model
from models_app.ml import loading
from models_app.ml.device import device_info, resolve_device
from models_app.ml.layers import find_blocks
from models_app.ml.loading import (
    QUANTIZATIONS,
    Backend,
    QuantizationError,
    backend_smoke_test,
    conv1d_to_linear,
    load_model,
    weights_nbytes,
)

CPU = torch.device("cpu")
IDS = torch.tensor([[0, 5, 17, 42, 99, 7, 250, 3], [0, 8, 9, 10, 11, 300, 12, 1]])  # (B=2, T=8)


@pytest.fixture(scope="module")
def repos(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("loading")
    return {
        "llama": build_tiny_model("llama", root / "llama"),
        "gpt2": build_tiny_model("gpt2", root / "gpt2"),
        # hidden 256: block Linear weights are 87% of the parameters
        "wide": build_tiny_model("llama", root / "wide", hidden=256),
    }


@pytest.fixture(scope="module")
def loaded(repos):
    """(arch, quantization) -> (model, report), each loaded once for this module."""
    cache: dict[tuple[str, str], tuple[nn.Module, loading.LoadReport]] = {}

    def get(arch: str, quantization: str):
        if (arch, quantization) not in cache:
            cache[arch, quantization] = load_model(repos[arch], quantization, CPU)
        return cache[arch, quantization]

    return get


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits  # (B, T, V)


def block_linears(model: nn.Module) -> list[nn.Module]:
    _, blocks = find_blocks(model)
    return [m for m in blocks.modules() if loading.is_linear_like(m)]


# --- the layers really are quantized --------------------------------------------------------------

EXPECTED_LAYER = {"Q8": bnb.nn.Linear8bitLt, "Q4": bnb.nn.Linear4bit, "Q2": QLinear}
EXPECTED_BACKEND = {
    "FP16": "torch", "Q8": "bitsandbytes-int8", "Q4": "bitsandbytes-nf4", "Q2": "quanto-int2",
}  # fmt: skip


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("quantization", ["Q8", "Q4", "Q2"])
def test_every_block_linear_is_quantized_with_the_expected_library(loaded, arch, quantization):
    model, report = loaded(arch, quantization)
    linears = block_linears(model)
    assert linears and all(isinstance(m, EXPECTED_LAYER[quantization]) for m in linears)
    assert all(loading.is_quantized(m) for m in linears)
    assert report.backend == EXPECTED_BACKEND[quantization]
    assert report.quantized_layers == len(linears)
    assert report.linear_layers == len(linears) + 1  # + the unquantized lm_head
    assert not loading.is_quantized(model.get_output_embeddings())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fp16_on_cpu_loads_float32_and_says_so(loaded, arch):
    model, report = loaded(arch, "FP16")
    assert report.compute_dtype == "float32" and next(model.parameters()).dtype == torch.float32
    assert report.quantized_layers == 0 and report.backend == "torch"
    assert "float32" in report.notice
    assert report.device == "cpu" and report.load_seconds > 0
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_q2_gpt2_has_its_conv1d_layers_converted_and_really_2bit(loaded):
    model, report = loaded("gpt2", "Q2")
    assert not any(isinstance(m, Conv1D) for m in model.modules())
    linears = block_linears(model)
    assert len(linears) == 4 * model.config.n_layer  # c_attn, c_proj, c_fc, mlp.c_proj
    assert all(m.weight_qtype == qint2 for m in linears)
    assert "Converted 8 Conv1D layers" in report.notice
    q8, _ = loaded("gpt2", "Q8")
    assert weights_nbytes(model) < weights_nbytes(q8)


def test_conv1d_to_linear_keeps_the_model_output(repos):
    model, _ = load_model(repos["gpt2"], "FP16", CPU)
    before = logits(model)
    assert conv1d_to_linear(model) == 4 * model.config.n_layer
    assert not any(isinstance(m, Conv1D) for m in model.modules())
    torch.testing.assert_close(logits(model), before, rtol=1e-5, atol=1e-5)


# --- forward --------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_quantized_forwards_are_finite_and_q8_stays_close_to_fp32(loaded, arch):
    reference = logits(loaded(arch, "FP16")[0])
    for quantization in ("Q8", "Q4", "Q2"):
        got = logits(loaded(arch, quantization)[0])
        assert got.shape == reference.shape and torch.isfinite(got).all()
    q8 = logits(loaded(arch, "Q8")[0])
    assert float((q8 - reference).norm() / reference.norm()) < 0.05


# --- footprint ------------------------------------------------------------------------------------


def test_footprint_shrinks_fp32_q8_q4_q2_on_a_linear_heavy_model(loaded):
    sizes = [loaded("wide", q)[1].footprint_bytes for q in QUANTIZATIONS]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == 4
    model, report = loaded("wide", "FP16")
    fp32 = sum(p.numel() * 4 for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers()
    )
    assert report.footprint_bytes == fp32 == weights_nbytes(model)


@pytest.mark.parametrize(
    ("quantization", "low", "high"),
    [("Q8", 0.50, 0.53), ("Q4", 0.25, 0.28), ("Q2", 0.125, 0.16)],  # of the float16 bytes
)
def test_block_linear_bytes_match_the_bit_width(loaded, quantization, low, high):
    """Int8 = ½ of float16 + a row scale; NF4 = ¼ + absmax; int2 = ⅛ + float32 scale/shift."""
    model, _ = loaded("wide", quantization)
    linears = block_linears(model)
    fp16_bytes = 2 * sum(m.in_features * m.out_features for m in linears)
    stored = sum(weights_nbytes(m) for m in linears)
    assert low * fp16_bytes <= stored <= high * fp16_bytes


def test_weights_nbytes_counts_a_tied_embedding_once(loaded):
    model, _ = loaded("gpt2", "FP16")
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert weights_nbytes(model) == sum(p.numel() * 4 for p in model.parameters())


# --- refusals -------------------------------------------------------------------------------------


def test_an_unknown_quantization_is_a_value_error(repos):
    with pytest.raises(ValueError, match="unknown quantization 'Q3'"):
        load_model(repos["llama"], "Q3", CPU)


def test_a_pickle_only_folder_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no .safetensors"):
        load_model(build_pickle_only_repo(tmp_path / "pickle"), "FP16", CPU)


def _load_quanto_int2_without_conversion(folder, device, dtype):
    """The trap from the field notes: quanto's quantize on GPT-2 skips every Conv1D."""
    from optimum.quanto import freeze, quantize

    model = loading._from_pretrained(folder, dtype, device)
    quantize(model, weights="qint2", exclude=["lm_head"])
    freeze(model)
    return model, ""


def test_a_quantized_option_that_quantized_nothing_raises(repos):
    skipped = Backend("quanto-int2-no-conv1d", _load_quanto_int2_without_conversion,
                      loading.QUANTO_INT2.quantize_layer)  # fmt: skip
    with pytest.raises(QuantizationError, match="quantized 0 of 8 Linear layers"):
        load_model(repos["gpt2"], "Q2", CPU, backends=[skipped])


# --- backend smoke test and fallback --------------------------------------------------------------


class KernelMissing(nn.Module):
    """What bitsandbytes does on Jetson Orin (sm_87): it imports, the first kernel fails."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("CUDA error: no kernel image is available for execution on the device")


def _never_loads(folder, device, dtype):
    raise AssertionError("a backend that failed its smoke test must not load")


JETSON_BNB = Backend("bitsandbytes-int8-sm87", _never_loads, lambda layer, d, t: KernelMissing())


def test_the_default_backends_pass_their_smoke_test_on_cpu():
    for quantization in QUANTIZATIONS:
        assert backend_smoke_test(CPU, quantization) is None


def test_q8_falls_back_to_quanto_int8_when_bitsandbytes_kernels_are_missing(repos):
    model, report = load_model(
        repos["llama"], "Q8", CPU, backends=[JETSON_BNB, loading.QUANTO_INT8]
    )
    assert report.backend == "quanto-int8" and report.quantization == "Q8"
    assert "bitsandbytes-int8-sm87 failed its smoke test" in report.notice
    assert "no kernel image" in report.notice and "loaded with quanto-int8" in report.notice
    assert all(isinstance(m, QLinear) for m in block_linears(model))
    assert report.quantized_layers == len(block_linears(model))
    assert torch.isfinite(logits(model)).all()


def test_the_smoke_test_result_is_cached_per_backend_and_device():
    calls = []

    def quantize_layer(layer, device, dtype):
        calls.append(device)
        return layer

    counted = Backend("counted", _never_loads, quantize_layer)
    assert backend_smoke_test(CPU, "Q8", counted) is None
    assert backend_smoke_test(CPU, "Q8", counted) is None
    assert calls == [CPU]


def test_when_no_backend_works_the_error_lists_every_reason(repos):
    broken = Backend("quanto-int8-sm87", _never_loads, lambda layer, d, t: KernelMissing())
    with pytest.raises(QuantizationError, match="no backend can run Q8") as err:
        load_model(repos["llama"], "Q8", CPU, backends=[JETSON_BNB, broken])
    assert "bitsandbytes-int8-sm87" in str(err.value) and "quanto-int8-sm87" in str(err.value)


def test_real_bitsandbytes_fails_its_smoke_test_on_a_device_without_kernels():
    assert backend_smoke_test(torch.device("meta"), "Q8") is not None


# --- device ---------------------------------------------------------------------------------------


def test_auto_device_is_cuda_only_when_available():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == CPU


def test_asking_for_cuda_without_a_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        assert resolve_device("cuda").type == "cuda"
    else:
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
    with pytest.raises(ValueError, match="unknown device setting"):
        resolve_device("tpu")


def test_cpu_device_info_reports_memory_in_bytes():
    info = device_info(CPU)
    assert info["kind"] == "cpu" and info["name"].startswith("CPU: ")
    assert info["total_bytes"] >= info["free_bytes"] > 0
    assert info["used_bytes"] == info["total_bytes"] - info["free_bytes"]


def test_a_lock_left_by_a_killed_process_does_not_stop_a_2_bit_load(tiny_repo):
    """torch's JIT loader takes a lock file in the extension's build folder for every process's
    first 2-bit use; a process killed at that moment left it behind and every later Q2 load
    waited for ever (seen when the crash tests killed a GPU worker mid-load). A built extension
    is imported without that lock."""
    import subprocess
    import sys

    from optimum.quanto.library.extensions import get_extension

    from mistudio.testing.live import ROOT

    lock = Path(get_extension("quanto_cpp").build_directory) / "lock"
    code = (
        "import sys, torch; from models_app.ml.loading import load_model; "
        "model, report = load_model(sys.argv[1], 'Q2', torch.device('cpu')); print(report.backend)"
    )
    made = not lock.exists()
    lock.touch()
    try:
        r = subprocess.run([sys.executable, "-c", code, str(tiny_repo("llama"))], cwd=ROOT,
                           capture_output=True, text=True, timeout=600)  # fmt: skip
    finally:
        if made:
            lock.unlink(missing_ok=True)
    assert r.returncode == 0 and "quanto-int2" in r.stdout, r.stderr[-2000:]
