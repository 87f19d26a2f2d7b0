"""Find the transformer blocks of any Hugging Face causal LM by introspection."""

from __future__ import annotations

from torch import nn

from .configs import num_layers

# Architectures whose block list cannot be found by length alone (path under the top-level model).
BLOCK_PATH_OVERRIDES: dict[str, str] = {}


def text_decoder(model: nn.Module) -> nn.Module:
    """The module that holds the text decoder's blocks: the language model of a multimodal model
    (so a vision tower's encoder layers are never taken for the blocks), else the base model."""
    get = getattr(model, "get_decoder", None)
    try:
        decoder = get() if get is not None else None
    except (AttributeError, NotImplementedError, ValueError):
        decoder = None
    return decoder if isinstance(decoder, nn.Module) else getattr(model, "base_model", model)


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return (dotted path from `model`, the ModuleList of transformer blocks).

    The blocks are the `nn.ModuleList` under the text decoder (see text_decoder) whose length is
    the text config's layer count (`num_hidden_layers`, or its block pattern's length); the
    shallowest such list wins. Raises ValueError when none matches.
    """
    config = model.config
    override = BLOCK_PATH_OVERRIDES.get(getattr(config, "model_type", ""))
    if override:
        return override, model.get_submodule(override)
    n = num_layers(config)
    base = text_decoder(model)
    prefix = next((name for name, mod in model.named_modules() if mod is base), "")
    candidates = [
        (name, mod)
        for name, mod in base.named_modules()
        if isinstance(mod, nn.ModuleList) and len(mod) == n
    ]
    if not candidates:
        raise ValueError(
            f"no ModuleList of length num_hidden_layers={n} found in {type(model).__name__}"
        )
    name, blocks = min(candidates, key=lambda c: c[0].count("."))
    path = ".".join(p for p in (prefix, name) if p)
    return path, blocks
