"""Check on a GPU that every site is stored and summarized as it was at hook time.

    python -m benchmarks.device_check_sites [--device cuda]

For blocks that modify hooked tensors in place after the hook (Falcon-7B and -40B layouts, and a
Llama layer rewritten as a parallel block doing `mlp += attn; hidden += mlp`), post-norm blocks
(Gemma-2, OLMo-2) and a plain Llama: extract every site (resid_pre/post, attn_out, mlp_out, hook_z,
ln_final, a module path) with `run_extraction` at FP16 (float16 compute), stored as float32 and as
bfloat16, and compare each shard and each manifest statistic with plain torch hooks that clone
at hook time on the same model and the same token ids. On CUDA the device->host copies run on a
side stream; they must read the snapshot, not the tensor the block changes afterwards. The last
line printed is one JSON object: {"device", "ok", "results": [...]}.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from mistudio.testing.tiny_models import build_tiny_model
from models_app.ml.device import resolve_device
from models_app.ml.extract import ExtractionSpec, run_extraction
from models_app.ml.loading import load_model
from models_app.ml.storage import verify

from .workload import corpus, load_tokenizer

LLAMA = ("model.layers", "self_attn", "mlp", "self_attn.o_proj", "model.norm", "mlp.down_proj")
POST = ("model.layers", "post_attention_layernorm", "post_feedforward_layernorm",
        "self_attn.o_proj", "model.norm", "mlp.down_proj")  # fmt: skip
FALCON = ("transformer.h", "self_attention", "mlp", "self_attention.dense", "transformer.ln_f",
          "mlp.dense_4h_to_h")  # fmt: skip
CASES = {"inplace": ("llama", LLAMA), "falcon": ("falcon", FALCON),
         "falcon_new": ("falcon_new", FALCON), "gemma2": ("gemma2", POST),
         "olmo2": ("olmo2", POST), "llama": ("llama", LLAMA)}  # fmt: skip
LAYERS = [0, 1, 2]


class InPlaceParallelLayer(nn.Module):
    """A Llama layer as a parallel block that changes hooked tensors after the hooks."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.input_layernorm, self.self_attn, self.mlp = (
            layer.input_layernorm, layer.self_attn, layer.mlp
        )  # fmt: skip

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        x = self.input_layernorm(hidden_states)  # (B, T, d)
        attn, _ = self.self_attn(hidden_states=x, **kwargs)
        mlp = self.mlp(x)
        mlp += attn
        hidden_states += mlp
        return hidden_states


def reference(model: nn.Module, paths: tuple, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every site for ids (B, T): plain torch hooks that clone at hook time."""
    blocks, attn, mlp, proj, norm, inner = paths
    heads = model.config.num_attention_heads
    got: dict[str, torch.Tensor] = {}

    def out(name):
        return lambda m, a, o: got.__setitem__(name, (o[0] if isinstance(o, tuple) else o).clone())

    def inp(name):
        return lambda m, a: got.__setitem__(name, a[0].clone())

    hooks = []
    for i in LAYERS:
        b = f"{blocks}.{i}"
        sub = model.get_submodule
        hooks += [
            sub(b).register_forward_pre_hook(inp(f"blocks.{i}.hook_resid_pre")),
            sub(b).register_forward_hook(out(f"blocks.{i}.hook_resid_post")),
            sub(f"{b}.{attn}").register_forward_hook(out(f"blocks.{i}.hook_attn_out")),
            sub(f"{b}.{mlp}").register_forward_hook(out(f"blocks.{i}.hook_mlp_out")),
            sub(f"{b}.{proj}").register_forward_pre_hook(inp(f"blocks.{i}.attn.hook_z")),
        ]
    inner_path = f"{blocks}.1.{inner}"
    hooks += [
        model.get_submodule(norm).register_forward_hook(out("ln_final.hook_normalized")),
        model.get_submodule(inner_path).register_forward_hook(out(f"{inner_path}.hook_output")),
    ]
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    for i in LAYERS:
        z = got[f"blocks.{i}.attn.hook_z"]
        got[f"blocks.{i}.attn.hook_z"] = z.view(*z.shape[:2], heads, -1)
    return got


def _rel(got: float, want: float) -> float:
    return abs(got - want) / max(abs(want), 1e-12)


def check(case: str, device: torch.device, scratch: Path, storage: str) -> dict:
    arch, paths = CASES[case]
    folder = build_tiny_model(arch, scratch / f"{case}-model", layers=4, hidden=256)
    model, _ = load_model(folder, "FP16", device)
    if case == "inplace":
        layers = model.model.layers
        for i in range(len(layers)):
            layers[i] = InPlaceParallelLayer(layers[i])
    blocks, *_, inner = paths
    spec = ExtractionSpec(
        layers=LAYERS, hook_types=["residual", "attention", "mlp", "z", "ln_final"],
        include_resid_pre=True, context_size=128, batch_size=8, max_samples=48,
        shard_sequences=8, dtype=storage,
        module_sites=[{"path": f"{blocks}.1.{inner}", "io": "output"}],
    )  # fmt: skip
    out = scratch / f"{case}-{storage}"
    manifest = run_extraction(model, load_tokenizer(folder), corpus(3000), spec, out, meta={})
    row = {"case": case, "storage": storage, "compute": str(model.dtype),
           "verify": verify(out), "sites": len(manifest["hooks"]),
           "self_check": manifest["self_check"]["passed"]}  # fmt: skip
    hooks = manifest["hooks"]
    refs = []
    for shard in hooks[0]["shards"]:
        ids = load_file(out / shard["file"])["token_ids"].long().to(device)
        refs.append({k: v.cpu() for k, v in reference(model, paths, ids).items()})
    worst_abs, worst_stat, unequal = 0.0, 0.0, []
    for hook in hooks:
        name, dtype = hook["name"], getattr(torch, hook["dtype"])
        for shard, ref in zip(hook["shards"], refs, strict=True):
            got = load_file(out / shard["file"])["activations"]
            want = ref[name].to(dtype)
            if not torch.equal(got, want):
                unequal.append(name)
                worst_abs = max(worst_abs, float((got.double() - want.double()).abs().max()))
        x = torch.cat([r[name] for r in refs]).double()  # statistics: of the computed values
        x = x.reshape(-1, x[0, 0].numel())
        stats, norms = hook["statistics"], x.norm(dim=-1)
        std = float(x.std(correction=0))
        errors = (abs(stats["mean"] - float(x.mean())) / std, _rel(stats["std"], std),
                  _rel(stats["norm"]["mean"], float(norms.mean())))  # fmt: skip
        worst_stat = max(worst_stat, *errors)
    row |= {"unequal_sites": sorted(set(unequal)), "max_abs_diff": worst_abs,
            "max_rel_stat_err": worst_stat}  # fmt: skip
    row["ok"] = not row["verify"] and row["self_check"] and not unequal and worst_stat < 1e-5
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--cases", default=",".join(CASES))
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases.split(","):
            for storage in ("float32", "bfloat16"):
                try:
                    row = check(case, device, Path(tmp), storage)
                except Exception as exc:  # noqa: BLE001 - one failing case must not hide others
                    row = {"case": case, "storage": storage, "ok": False, "error": repr(exc)}
                print(json.dumps(row), flush=True)
                results.append(row)
    print(json.dumps({"device": str(device), "ok": all(r["ok"] for r in results),
                      "results": results}))  # fmt: skip


if __name__ == "__main__":
    main()
