"""Named capture sites on any Hugging Face decoder, resolved to real modules by introspection.

Names follow TransformerLens/SAELens, so their tools read ours:

    blocks.{i}.hook_resid_pre     block input                               (B, T, d)
    blocks.{i}.hook_resid_post    block output                              (B, T, d)
    blocks.{i}.hook_attn_out      the attention term the block adds to the residual stream
    blocks.{i}.hook_mlp_out       the MLP term the block adds to the residual stream
    blocks.{i}.attn.hook_z        each head's output before the output projection (B, T, H, d_head)
    ln_final.hook_normalized      the final norm's output                   (B, T, d)
    <module path>.hook_input / .hook_output   any module's input or output  (B, T, …)

The branch sites are read from the module whose output IS the term added to the residual stream:
the attention / MLP child, or, on post-norm blocks (Gemma 2/3, OLMo-2: a norm after each branch),
that branch's post-norm. The seed's names are aliases: residual -> resid_post, mlp -> mlp_out,
attention -> attn_out.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from .configs import text_config
from .layers import find_blocks

LAYER_HOOK_TYPES: tuple[str, ...] = ("resid_pre", "resid_post", "attn_out", "mlp_out", "z")
HOOK_TYPES: tuple[str, ...] = (*LAYER_HOOK_TYPES, "ln_final")
SUM_HOOK_TYPES: tuple[str, ...] = ("resid_pre", "resid_post", "attn_out", "mlp_out")
HOOK_ALIASES: dict[str, str] = {
    "residual": "resid_post",
    "mlp": "mlp_out",
    "attention": "attn_out",
    "attn.hook_z": "z",
    "attn_z": "z",
    "ln_final.hook_normalized": "ln_final",
    "normalized": "ln_final",
}
BRANCH_HOOK_TYPES: frozenset[str] = frozenset({"attn_out", "mlp_out"})
MODULE_IO: tuple[str, ...] = ("input", "output")

# Block children that are the self-attention / the MLP, in order of preference.
ATTN_CHILD_NAMES: tuple[str, ...] = ("self_attn", "attn", "attention", "self_attention")
MLP_CHILD_NAMES: tuple[str, ...] = ("mlp", "feed_forward", "ffn", "ff", "block_sparse_moe")
# Post-branch norms: (after attention, after MLP). A block with both adds their outputs.
POST_BRANCH_NORMS: tuple[tuple[str, str], ...] = (
    ("post_attention_layernorm", "post_feedforward_layernorm"),  # Gemma 2/3, OLMo-2, EXAONE 4
    ("post_attention_norm", "post_feedforward_norm"),
)
# Children of the attention module that are its output projection (input: heads concatenated).
OUT_PROJ_NAMES: tuple[str, ...] = ("o_proj", "c_proj", "dense", "out_proj", "wo")

_SITE_RE = re.compile(r"^blocks\.(\d+)\.(hook_\w+|attn\.hook_z)$")
_MODULE_SITE_RE = re.compile(r"^(.+)\.hook_(input|output)$")


class HookSiteError(ValueError):
    """A hook type, layer, module or site that does not exist on this model."""


@dataclass(frozen=True)
class Site:
    """One capture point: `name` as stored on disk, `module_path` the HF module it is read from.

    `reads` is the module's "output" or "input"; `heads` splits the last dim into
    (heads, d_head) (hook_z); `layer` is None outside the blocks.
    """

    name: str  # blocks.3.hook_mlp_out
    layer: int | None
    hook_type: str  # one of HOOK_TYPES, or "module"
    module_path: str  # model.layers.3.mlp
    reads: str = "output"
    heads: int | None = None


def canonical_hook_type(name: str) -> str:
    """Map 'residual', 'resid_post', 'hook_resid_post', 'attn.hook_z' … to a HOOK_TYPES name."""
    key = name.strip().lower()
    key = HOOK_ALIASES.get(key, key).removeprefix("hook_")
    key = HOOK_ALIASES.get(key, key)
    if key not in HOOK_TYPES:
        known = ", ".join([*HOOK_TYPES, *HOOK_ALIASES])
        raise HookSiteError(f"unknown hook type {name!r}; known: {known}")
    return key


def site_name(layer: int | None, hook_type: str) -> str:
    """The on-disk name of a site, e.g. site_name(3, 'mlp') == 'blocks.3.hook_mlp_out'."""
    kind = canonical_hook_type(hook_type)
    if kind == "ln_final":
        return "ln_final.hook_normalized"
    if kind == "z":
        return f"blocks.{layer}.attn.hook_z"
    return f"blocks.{layer}.hook_{kind}"


def module_site_name(path: str, io: str) -> str:
    """'model.layers.3.mlp.down_proj.hook_output' for the output of that module."""
    return f"{path}.hook_{io}"


def parse_site_name(name: str) -> tuple[int | None, str]:
    """Inverse of `site_name`: 'blocks.3.hook_mlp_out' -> (3, 'mlp_out'),
    'ln_final.hook_normalized' -> (None, 'ln_final')."""
    if name == "ln_final.hook_normalized":
        return None, "ln_final"
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


def branch_term_names(block: nn.Module) -> tuple[str, str]:
    """(attention term, MLP term) child names: the modules whose outputs the block adds to the
    residual stream. On a post-norm block (a norm after each branch) these are the norms."""
    children = dict(block.named_children())
    for attn_norm, mlp_norm in POST_BRANCH_NORMS:
        if attn_norm in children and mlp_norm in children:
            return attn_norm, mlp_norm
    return branch_child_names(block)


def out_proj_path(block: nn.Module, block_path: str) -> str:
    """Path of the attention output projection of a block (its input is hook_z)."""
    attn = _find_child(block, ATTN_CHILD_NAMES, "self-attention")
    proj = _find_child(getattr(block, attn), OUT_PROJ_NAMES, "attention output projection")
    return f"{block_path}.{attn}.{proj}"


def find_final_norm(model: nn.Module) -> str:
    """Path of the final norm: the first *Norm child registered after the blocks in their parent
    (model.norm, transformer.ln_f, gpt_neox.final_layer_norm …). HookSiteError when none."""
    path, blocks = find_blocks(model)
    parent_path = path.rpartition(".")[0]
    parent = model.get_submodule(parent_path) if parent_path else model
    names = [name for name, _ in parent.named_children()]
    after = names[names.index(path.rpartition(".")[2]) + 1 :]
    for name in after:
        if "norm" in type(getattr(parent, name)).__name__.lower():
            return f"{parent_path}.{name}" if parent_path else name
    raise HookSiteError(f"{type(model).__name__} has no final norm after its blocks")


def num_heads(model: nn.Module) -> int:
    config = text_config(model.config)
    for key in ("num_attention_heads", "n_head", "num_heads"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    raise HookSiteError(f"cannot find the number of attention heads of {type(model).__name__}")


def _layer_site(model, blocks, block_path: str, layer: int, kind: str) -> Site:
    name = site_name(layer, kind)
    block = blocks[layer]
    if kind == "resid_pre":
        return Site(name, layer, kind, block_path, reads="input")
    if kind == "resid_post":
        return Site(name, layer, kind, block_path)
    if kind == "z":
        path = out_proj_path(block, block_path)
        return Site(name, layer, kind, path, reads="input", heads=num_heads(model))
    attn, mlp = branch_term_names(block)
    return Site(name, layer, kind, f"{block_path}.{attn if kind == 'attn_out' else mlp}")


def resolve_sites(model: nn.Module, layers: Sequence[int], hook_types: Sequence[str]) -> list[Site]:
    """Sites for every (layer, hook type) pair, ordered by layer then by HOOK_TYPES order; an
    'ln_final' type adds the one ln_final.hook_normalized site last.

    Raises HookSiteError for an unknown hook type, a layer out of range or a block without a
    recognisable attention/MLP/output-projection child (only when a site needs it).
    """
    path, blocks = find_blocks(model)
    types = sorted({canonical_hook_type(t) for t in hook_types}, key=HOOK_TYPES.index)
    sites = []
    for layer in sorted(set(layers)):
        if not 0 <= layer < len(blocks):
            raise HookSiteError(f"layer {layer} out of range: the model has {len(blocks)} blocks")
        for kind in types:
            if kind != "ln_final":
                sites.append(_layer_site(model, blocks, f"{path}.{layer}", layer, kind))
    if "ln_final" in types:
        sites.append(Site(site_name(None, "ln_final"), None, "ln_final", find_final_norm(model)))
    return sites


def resolve_module_site(model: nn.Module, path: str, io: str) -> Site:
    """The site reading module `path`'s input or output. HookSiteError (naming close matches)
    when the module does not exist or `io` is neither 'input' nor 'output'."""
    if io not in MODULE_IO:
        raise HookSiteError(f"{path}: read 'input' or 'output', not {io!r}")
    names = [name for name, _ in model.named_modules() if name]
    if path not in names:
        close = difflib.get_close_matches(path, names, n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise HookSiteError(f"{type(model).__name__} has no module {path!r}{hint}")
    blocks_path, blocks = find_blocks(model)
    layer = None
    if path.startswith(blocks_path + "."):
        layer = int(path[len(blocks_path) + 1 :].split(".")[0])
    return Site(module_site_name(path, io), layer, "module", path, reads=io)


def known_shape(model: nn.Module, site: Site, d: int) -> tuple[int, ...] | None:
    """Shape of one token's tensor at `site` without running the model: (d,) for the residual,
    branch and final-norm sites, (H, d_head) for hook_z; None for a module path (probe it)."""
    if site.hook_type == "module":
        return None
    if site.heads is None:
        return (d,)
    proj = model.get_submodule(site.module_path)
    width = proj.in_features if hasattr(proj, "in_features") else proj.weight.shape[0]  # Conv1D
    if width % site.heads:
        raise HookSiteError(f"{site.name}: width {width} is not a multiple of {site.heads} heads")
    return (site.heads, width // site.heads)


def stop_module(model: nn.Module, sites: Sequence[Site]) -> str | None:
    """Path of the module after which no site can fire any more (the forward may stop there):
    the deepest hooked block, or the final norm; None when a site lies elsewhere."""
    blocks_path, blocks = find_blocks(model)
    norm = None
    deepest = -1
    for site in sites:
        if site.layer is not None:
            deepest = max(deepest, site.layer)
            continue
        norm = norm or _final_norm_or_none(model)
        if norm is None or not (site.module_path + ".").startswith(norm + "."):
            return None
        deepest = len(blocks)
    if deepest < 0:
        return None
    return norm if deepest == len(blocks) else f"{blocks_path}.{deepest}"


def _final_norm_or_none(model: nn.Module) -> str | None:
    try:
        return find_final_norm(model)
    except HookSiteError:
        return None
