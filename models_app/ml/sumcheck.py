"""The sum check: resid_post − resid_pre ≈ attn_out + mlp_out, per layer.

It verifies that the branch sites are exactly the terms the block adds to the residual stream
(after the post-branch norms where the block has them). Where it fails, no module of the block
outputs those terms (BLOOM's attention adds the residual itself, for example) and the branch
sites are refused with the modules that were tried.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from .errors import ExtractionError
from .hooks import SUM_HOOK_TYPES, Site, capture, resolve_sites

# Relative tolerance of the sum check, by compute dtype: fp32 adds are exact up to rounding;
# fp16/bf16 round the residual stream at every add (errors of eps·‖resid‖/‖Δ‖, up to a few %).
# Architectures whose branch outputs are not what the block adds fail at ~100% (measured: BLOOM
# 7000%, MPT 130%; Gemma-2/3 and OLMo-2 99% before their post-branch norms were read).
SUM_CHECK_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6}
SUM_CHECK_TOLERANCE_HALF = 0.1


def compute_dtype(model: nn.Module) -> torch.dtype:
    return getattr(model, "dtype", torch.float32)


class SumCheck:
    """Sink that scores each layer as soon as its four sites arrived, then drops them.

    Each tensor is copied to float64 at hook time: a snapshot, whatever the block does later.
    """

    def __init__(self):
        self.pending: dict[int, dict[str, torch.Tensor]] = {}
        self.errors: dict[int, float] = {}
        self.nonfinite: list[str] = []
        self.paths: dict[str, str] = {}  # site name -> module path, for the refusal message

    def __call__(self, site: Site, t: torch.Tensor) -> None:
        if not torch.isfinite(t).all():
            self.nonfinite.append(site.name)
        self.paths[site.name] = site.module_path
        g = self.pending.setdefault(site.layer, {})
        g[site.hook_type] = t.to(torch.float64, copy=True)  # (B, T, d)
        if len(g) == len(SUM_HOOK_TYPES):
            delta = g["resid_post"] - g["resid_pre"]  # (B, T, d)
            residue = delta - (g["attn_out"] + g["mlp_out"])  # (B, T, d)
            self.errors[site.layer] = float(residue.norm() / delta.norm().clamp_min(1e-30))
            del self.pending[site.layer]

    def result(self, model: nn.Module) -> dict:
        """The self_check dict (see `self_check`) of what this sink has seen."""
        errors = self.errors
        tol = SUM_CHECK_TOLERANCE.get(compute_dtype(model), SUM_CHECK_TOLERANCE_HALF)
        worst = max(errors, key=lambda k: (math.isnan(errors[k]), errors[k]))
        return {
            "passed": not self.nonfinite and all(e <= tol for e in errors.values()),
            "nonfinite": self.nonfinite,
            "tolerance": tol,
            "max_rel_error": {str(k): v for k, v in errors.items()},
            "worst_layer": worst,
            "modules": {
                kind: self.paths.get(f"blocks.{worst}.hook_{kind}")
                for kind in ("attn_out", "mlp_out")
            },
        }


def self_check(model: nn.Module, batch: torch.Tensor, layers: Iterable[int]) -> dict:
    """Check, per layer, that the branch sites add up to the block's residual update.

    batch: (B, T) token ids on the model's device. Returns {"passed", "nonfinite": [site names
    with inf/NaN], "tolerance", "max_rel_error": {layer: ‖Δ − (attn + mlp)‖ / ‖Δ‖},
    "worst_layer", "modules": {attn_out, mlp_out: module path at the worst layer}} with
    Δ = resid_post − resid_pre, in float64. A layer fails when its error exceeds the compute
    dtype's tolerance. Holds one layer's four sites at a time.
    """
    sites = resolve_sites(model, list(layers), SUM_HOOK_TYPES)
    check = SumCheck()
    model.eval()
    with capture(model, sites, check) as cap:
        cap.forward(batch)
    return check.result(model)


def refuse_branch_sites(check: dict, model: nn.Module) -> None:
    """Raise ExtractionError when a failed self-check makes attention/MLP sites untrustworthy."""
    if check["passed"]:
        return
    if check["nonfinite"]:
        names = ", ".join(check["nonfinite"])
        raise ExtractionError(f"inf/NaN values in {names}: activations are not finite")
    layer = check["worst_layer"]
    err = check["max_rel_error"][str(layer)]
    modules = check.get("modules") or {}
    tried = " and ".join(f"{p!r}" for p in modules.values() if p) or "its branch modules"
    raise ExtractionError(
        f"attention/mlp sites are refused for {type(model).__name__}: at layer {layer}, "
        f"resid_post - resid_pre differs from attn_out + mlp_out by {err:.1%} "
        f"(tolerance {check['tolerance']:.1%}). No module of this block outputs the terms it adds "
        f"to the residual stream: the outputs of {tried} do not add up (e.g. a branch that adds "
        "the residual itself). Extract 'residual', hook_z or a module path instead."
    )
