"""Named hook sites on any Hugging Face decoder, and a context manager that captures them.

Site names follow TransformerLens/SAELens: ``blocks.{i}.hook_resid_pre`` (block input),
``blocks.{i}.hook_resid_post`` (block output), ``blocks.{i}.hook_attn_out`` (output of the
block's self-attention module) and ``blocks.{i}.hook_mlp_out`` (output of the block's MLP module).
The seed's names are aliases: residual -> resid_post, mlp -> mlp_out, attention -> attn_out.

Every site resolves to a real module path of the Hugging Face model by introspection: the blocks
come from `layers.find_blocks`, the branch modules are the block children with a conventional name.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass

import torch
from torch import nn

from .layers import find_blocks

HOOK_TYPES: tuple[str, ...] = ("resid_pre", "resid_post", "attn_out", "mlp_out")
HOOK_ALIASES: dict[str, str] = {"residual": "resid_post", "mlp": "mlp_out", "attention": "attn_out"}
BRANCH_HOOK_TYPES: frozenset[str] = frozenset({"attn_out", "mlp_out"})

# Block children that are the self-attention / the MLP, in order of preference.
ATTN_CHILD_NAMES: tuple[str, ...] = ("self_attn", "attn", "attention", "self_attention")
MLP_CHILD_NAMES: tuple[str, ...] = ("mlp", "feed_forward", "ffn", "ff", "block_sparse_moe")

_SITE_RE = re.compile(r"^blocks\.(\d+)\.hook_(\w+)$")

Sink = Callable[["Site", torch.Tensor], None]


class HookSiteError(ValueError):
    """A hook type, layer or site that does not exist on this model."""


class _StopForward(Exception):  # noqa: N818 - control flow, not an error
    """Raised by the last needed hook so that no later block, final norm or lm_head runs."""


@dataclass(frozen=True)
class Site:
    """One capture point: `name` as stored on disk, `module_path` the HF module it is read from."""

    name: str  # blocks.3.hook_mlp_out
    layer: int
    hook_type: str  # one of HOOK_TYPES
    module_path: str  # model.layers.3.mlp


def canonical_hook_type(name: str) -> str:
    """Map 'residual', 'resid_post', 'hook_resid_post' … to the canonical 'resid_post'."""
    key = name.strip().lower().removeprefix("hook_")
    key = HOOK_ALIASES.get(key, key)
    if key not in HOOK_TYPES:
        known = ", ".join([*HOOK_TYPES, *HOOK_ALIASES])
        raise HookSiteError(f"unknown hook type {name!r}; known: {known}")
    return key


def site_name(layer: int, hook_type: str) -> str:
    """The on-disk name of a site, e.g. site_name(3, 'mlp') == 'blocks.3.hook_mlp_out'."""
    return f"blocks.{layer}.hook_{canonical_hook_type(hook_type)}"


def parse_site_name(name: str) -> tuple[int, str]:
    """Inverse of `site_name`: 'blocks.3.hook_mlp_out' -> (3, 'mlp_out')."""
    match = _SITE_RE.match(name)
    if not match:
        raise HookSiteError(f"not a site name: {name!r} (expected blocks.<i>.hook_<type>)")
    return int(match.group(1)), canonical_hook_type(match.group(2))


def _find_child(block: nn.Module, names: Sequence[str], what: str) -> str:
    children = dict(block.named_children())
    for name in names:
        if name in children:
            return name
    raise HookSiteError(
        f"cannot find the {what} module of {type(block).__name__}: tried {list(names)}, "
        f"children are {sorted(children)}"
    )


def branch_child_names(block: nn.Module) -> tuple[str, str]:
    """(attention child name, MLP child name) of one transformer block, found by convention."""
    return (
        _find_child(block, ATTN_CHILD_NAMES, "self-attention"),
        _find_child(block, MLP_CHILD_NAMES, "MLP"),
    )


def resolve_sites(model: nn.Module, layers: Sequence[int], hook_types: Sequence[str]) -> list[Site]:
    """Sites for every (layer, hook type) pair, ordered by layer then by HOOK_TYPES order.

    Raises HookSiteError for an unknown hook type, a layer out of range or a block without a
    recognisable attention/MLP child (only when a branch site is asked for).
    """
    path, blocks = find_blocks(model)
    types = sorted({canonical_hook_type(t) for t in hook_types}, key=HOOK_TYPES.index)
    sites = []
    for layer in sorted(set(layers)):
        if not 0 <= layer < len(blocks):
            raise HookSiteError(f"layer {layer} out of range: the model has {len(blocks)} blocks")
        block_path = f"{path}.{layer}"
        for hook_type in types:
            module_path = block_path
            if hook_type in BRANCH_HOOK_TYPES:
                attn, mlp = branch_child_names(blocks[layer])
                module_path += "." + (attn if hook_type == "attn_out" else mlp)
            sites.append(Site(site_name(layer, hook_type), layer, hook_type, module_path))
    return sites


def _unwrap(output: object, site: Site) -> torch.Tensor:
    # Unwrap ONLY tuples: transformers 5 blocks may return a bare (B, T, d) tensor, where [0]
    # would silently take batch element 0.
    if isinstance(output, tuple):
        output = output[0]
    if not isinstance(output, torch.Tensor):
        raise HookSiteError(f"{site.name}: {site.module_path} returned {type(output).__name__}")
    return output


def _pre_hook(site: Site, sink: Sink) -> Callable:
    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs.get("hidden_states")
        sink(site, _unwrap(hidden, site))

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
    def forward(self, input_ids: torch.Tensor) -> None:
        """Run `model` on input_ids (B, T) up to the deepest hooked block; nothing is returned."""
        with suppress(_StopForward):
            self.model(input_ids=input_ids, use_cache=False)


def _register(model: nn.Module, sites: Sequence[Site], sink: Sink, stop: bool, handles: list):
    """Register the capture hooks (and the early stop) on `model`, appending to `handles`."""
    for site in sites:
        module = model.get_submodule(site.module_path)
        if site.hook_type == "resid_pre":
            hook = _pre_hook(site, sink)
            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        else:
            handles.append(module.register_forward_hook(_post_hook(site, sink)))
    if stop and sites:
        # Registered last, so it fires after every capture hook on the deepest block.
        _, blocks = find_blocks(model)
        handles.append(blocks[max(s.layer for s in sites)].register_forward_hook(_stop_hook))


@contextmanager
def capture(
    model: nn.Module, sites: Sequence[Site], sink: Sink, *, stop_after_deepest: bool = True
) -> Iterator[Capture]:
    """Register forward hooks for `sites`; each hooked tensor (B, T, d) goes to sink(site, tensor).

    The hooks do nothing but call the sink (the sink decides whether to copy). With
    `stop_after_deepest`, the forward stops after the deepest hooked block: later blocks, the final
    norm and lm_head never run. Use the yielded `Capture.forward`, or call the model directly in
    the body (the early stop is then swallowed on leaving the block). Hooks are removed in
    `finally`.
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
