"""A context manager that captures named sites (see sites.py) with forward hooks.

The hooks hand each hooked tensor to a sink at the moment the module produced (or received) it.
A block may change that very tensor in place later (Falcon's parallel block does
`mlp_output += attention_output` after the MLP returned), so a sink that keeps a tensor beyond
the call must copy it there (extract.py snapshots every site on the device at hook time).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress

import torch
from torch import nn

from .sites import (
    BRANCH_HOOK_TYPES,
    HOOK_ALIASES,
    HOOK_TYPES,
    LAYER_HOOK_TYPES,
    SUM_HOOK_TYPES,
    HookSiteError,
    Site,
    branch_child_names,
    branch_term_names,
    canonical_hook_type,
    find_final_norm,
    known_shape,
    parse_site_name,
    resolve_module_site,
    resolve_sites,
    site_name,
    stop_module,
)

__all__ = [
    "BRANCH_HOOK_TYPES", "HOOK_ALIASES", "HOOK_TYPES", "LAYER_HOOK_TYPES", "SUM_HOOK_TYPES",
    "HookSiteError", "Site", "branch_child_names", "branch_term_names", "canonical_hook_type",
    "capture", "find_final_norm", "known_shape", "parse_site_name", "probe_shapes",
    "resolve_module_site", "resolve_sites", "site_name", "stop_module",
]  # fmt: skip

Sink = Callable[[Site, torch.Tensor], None]


class _StopForward(Exception):  # noqa: N818 - control flow, not an error
    """Raised by the last needed hook so that no later block, final norm or lm_head runs."""


def _unwrap(output: object, site: Site) -> torch.Tensor:
    """The hooked tensor (B, T, …); hook_z's (B, T, H·d_head) is viewed as (B, T, H, d_head)."""
    # Unwrap ONLY tuples: transformers 5 blocks may return a bare (B, T, d) tensor, where [0]
    # would silently take batch element 0.
    if isinstance(output, tuple) and output:
        output = output[0]
    if not isinstance(output, torch.Tensor):
        what = f"{site.reads} of {site.module_path}"
        raise HookSiteError(f"{site.name}: the {what} is a {type(output).__name__}, not a tensor")
    if site.heads is not None:
        *lead, width = output.shape
        if width % site.heads:
            raise HookSiteError(f"{site.name}: width {width} is not a multiple of {site.heads}")
        output = output.view(*lead, site.heads, width // site.heads)  # (B, T, H, d_head)
    return output


def _first_input(args: tuple, kwargs: dict) -> object:
    """A module's main input: its first positional argument, else hidden_states, else the first
    tensor keyword argument (HF blocks and attention modules are often called by keyword)."""
    if args:
        return args[0]
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    return next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)


def _pre_hook(site: Site, sink: Sink) -> Callable:
    def hook(module, args, kwargs):
        sink(site, _unwrap(_first_input(args, kwargs), site))

    return hook


def _post_hook(site: Site, sink: Sink) -> Callable:
    def hook(module, args, output):
        sink(site, _unwrap(output, site))

    return hook


def _stop_hook(module, args, output):
    raise _StopForward


class Capture:
    """Handle yielded by `capture`: runs forwards while the hooks are registered."""

    def __init__(self, model: nn.Module):
        self.model = model

    # no_grad, not inference_mode: optimum-quanto's packed int2 weights fail inside
    # inference_mode ("Cannot set version_counter for inference tensor").
    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, **kwargs) -> None:
        """Run `model` on input_ids (B, T) up to the deepest hooked block; nothing is returned."""
        with suppress(_StopForward):
            self.model(input_ids=input_ids, use_cache=False, **kwargs)


def _register(model: nn.Module, sites: Sequence[Site], sink: Sink, stop: bool, handles: list):
    """Register the capture hooks (and the early stop) on `model`, appending to `handles`."""
    for site in sites:
        module = model.get_submodule(site.module_path)
        if site.reads == "input":
            hook = _pre_hook(site, sink)
            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        else:
            handles.append(module.register_forward_hook(_post_hook(site, sink)))
    last = stop_module(model, sites) if stop and sites else None
    if last is not None:
        # Registered last, so it fires after every capture hook on that module.
        handles.append(model.get_submodule(last).register_forward_hook(_stop_hook))


@contextmanager
def capture(
    model: nn.Module, sites: Sequence[Site], sink: Sink, *, stop_after_deepest: bool = True
) -> Iterator[Capture]:
    """Register forward hooks for `sites`; each hooked tensor (B, T, …) goes to sink(site, tensor).

    The hooks do nothing but call the sink (the sink decides whether to copy; the tensor may be
    modified in place by the model after the sink returned). With `stop_after_deepest`, the
    forward stops after the deepest hooked block (or the final norm): later blocks, the final
    norm and lm_head never run (no early stop when a module site lies elsewhere). Use the
    yielded `Capture.forward`, or call the model directly in the body (the early stop is then
    swallowed on leaving the block). Hooks are removed in `finally`.
    """
    handles: list = []
    try:
        _register(model, sites, sink, stop_after_deepest, handles)
        yield Capture(model)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()


PROBE_TOKENS = 3


def probe_shapes(model: nn.Module, sites: Sequence[Site]) -> dict[str, tuple[int, ...]]:
    """{site name: shape of one token's tensor} (e.g. (d,), (H, d_head)), from one forward on
    1 × PROBE_TOKENS token ids. Works on a meta-device model (shapes only, no compute).

    Raises HookSiteError when a site's tensor is not (batch, tokens, …) floating-point
    activations (token ids, a flattened (B·T, d) …) or its module never runs in a forward.
    """
    shapes: dict[str, tuple[int, ...]] = {}

    def sink(site: Site, t: torch.Tensor) -> None:
        where = f"the {site.reads} of {site.module_path}"
        if not t.is_floating_point():
            raise HookSiteError(f"{site.name}: {where} is {t.dtype}, not activations")
        if tuple(t.shape[:2]) != (1, PROBE_TOKENS):
            raise HookSiteError(
                f"{site.name}: {where} has shape {tuple(t.shape)} for 1 sequence of "
                f"{PROBE_TOKENS} tokens, not (batch, tokens, …)"
            )
        shapes.setdefault(site.name, tuple(t.shape[2:]))

    device = model.get_input_embeddings().weight.device
    ids = torch.zeros((1, PROBE_TOKENS), dtype=torch.long, device=device)
    extra = {}
    if device.type == "meta":  # a ready-made (B, 1, T, T) mask: building one reads values
        extra["attention_mask"] = torch.zeros((1, 1, PROBE_TOKENS, PROBE_TOKENS), device=device)
    with capture(model, sites, sink) as cap:
        cap.forward(ids, **extra)
    missing = [s.name for s in sites if s.name not in shapes]
    if missing:
        raise HookSiteError(f"{', '.join(missing)}: the module does not run in a forward pass")
    return shapes
