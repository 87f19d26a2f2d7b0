"""Check that every quantization loads, is really quantized and extracts correctly on a device.

    python -m benchmarks.device_check [--device cuda] [--archs llama,gpt2]
                                      [--quantizations FP16,Q8,Q4,Q2]

For each architecture (a tiny real model built offline: 4 layers × 256) and quantization: load it
with `load_model`, count the classes of its Linear-like layers, extract layers 0-2 × residual,
mlp and attention with `run_extraction`, verify the shards against the manifest (sha256, shapes),
and compare each stored resid_post with the model's own `output_hidden_states[i + 1]` on the
shard's tokens. The suite checks all of this on the CPU; this command is how it is checked on a
GPU machine. The last line printed is one JSON object: {"device", "ok", "results": [...]}.
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
import time
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file

from mistudio.testing.tiny_models import build_tiny_model
from models_app.ml.device import resolve_device
from models_app.ml.extract import ExtractionSpec, run_extraction
from models_app.ml.loading import QUANTIZATIONS, is_linear_like, load_model
from models_app.ml.storage import verify

from .workload import corpus, load_tokenizer

LAYERS = [0, 1, 2]
HOOKS = ["residual", "mlp", "attention"]
# Max relative error of a stored resid_post against the reference forward: bf16 storage rounds
# to 2^-9 relative; a different batch size may pick other GPU kernels (reassociated sums).
TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2}


def check(arch: str, folder: Path, quantization: str, device: torch.device, scratch: Path):
    """One (architecture, quantization) row of the report."""
    row: dict = {"arch": arch, "quantization": quantization}
    try:
        _gpu_reset(device)
        model, report = load_model(folder, quantization, device)
        row |= {
            "backend": report.backend, "compute_dtype": report.compute_dtype,
            "notice": report.notice, "load_s": report.load_seconds,
            "weights_mb": round(report.footprint_bytes / 2**20, 3),
            "quantized_layers": [report.quantized_layers, report.linear_layers],
            "layer_classes": layer_classes(model), "gpu_mb_after_load": _gpu_mb(device),
        }  # fmt: skip
        row |= extract_and_compare(
            model, load_tokenizer(folder), scratch / f"{arch}-{quantization}"
        )
        row["gpu_peak_mb"] = _gpu_peak_mb(device)
        row["ok"] = not row["problems"] and row["self_check_passed"] and row["resid_ok"]
    except Exception as exc:  # reported per row: one failing quantization must not hide others
        row |= {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:600]}
    return row


def layer_classes(model) -> dict[str, int]:
    """{class name: count} of the Linear-like layers (nn.Linear, Linear8bitLt, QLinear, …)."""
    names = (type(m).__name__ for m in model.modules() if is_linear_like(m))
    return dict(collections.Counter(names))


def extract_and_compare(model, tokenizer, out_dir: Path) -> dict:
    spec = ExtractionSpec(layers=LAYERS, hook_types=HOOKS, context_size=64, batch_size=8,
                          max_samples=32)  # fmt: skip
    start = time.perf_counter()
    manifest = run_extraction(model, tokenizer, corpus(200), spec, out_dir, meta={})
    seconds = time.perf_counter() - start
    errors = resid_errors(model, out_dir, manifest)
    storage = manifest["hooks"][0]["dtype"]
    return {
        "tok_s": round(manifest["n_tokens"] / seconds, 1),
        "problems": verify(out_dir),
        "self_check_passed": manifest["self_check"]["passed"],
        "self_check_max_rel_error": manifest["self_check"]["max_rel_error"],
        "storage_dtype": storage,
        "resid_max_rel_error": errors,
        "resid_ok": max(errors.values()) <= TOLERANCE[storage],
    }


@torch.no_grad()
def resid_errors(model, out_dir: Path, manifest: dict) -> dict[str, float]:
    """{layer: ‖stored − reference‖ / ‖reference‖} of resid_post over the first shard."""
    device = model.get_input_embeddings().weight.device
    errors = {}
    for hook in manifest["hooks"]:
        if hook["hook_type"] != "resid_post":
            continue
        shard = load_file(out_dir / hook["shards"][0]["file"])
        ids = shard["token_ids"].long().to(device)  # (n, T)
        out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
        ref = out.hidden_states[hook["layer"] + 1].double().cpu()  # (n, T, d)
        got = shard["activations"].double()  # (n, T, d)
        errors[str(hook["layer"])] = float((got - ref).norm() / ref.norm())
    return errors


def _gpu_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _gpu_mb(device: torch.device) -> float | None:
    return round(torch.cuda.memory_allocated(device) / 2**20, 2) if device.type == "cuda" else None


def _gpu_peak_mb(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 2)


def run(device: torch.device, archs: list[str], quantizations: list[str]) -> dict:
    results = []
    with tempfile.TemporaryDirectory(prefix="mistudio-device-check-") as tmp:
        for arch in archs:
            folder = build_tiny_model(arch, Path(tmp) / arch, layers=4, hidden=256)
            for q in quantizations:
                results.append(check(arch, folder, q, device, Path(tmp)))
                print(json.dumps(results[-1]), flush=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    ok = all(r["ok"] for r in results)
    return {"device": str(device), "device_name": name, "ok": ok, "results": results,
            "torch": torch.__version__, "transformers": transformers.__version__}  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.device_check", description=__doc__)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--archs", default="llama,gpt2")
    p.add_argument("--quantizations", default=",".join(QUANTIZATIONS))
    args = p.parse_args(argv)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    result = run(
        resolve_device(args.device), args.archs.split(","),
        [q.strip().upper() for q in args.quantizations.split(",")],
    )  # fmt: skip
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    raise SystemExit(0 if main()["ok"] else 1)
