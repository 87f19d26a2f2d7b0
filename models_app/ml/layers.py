"""Find the transformer blocks of any Hugging Face causal LM by introspection."""

from __future__ import annotations

from torch import nn

# Architectures whose block list cannot be found by length alone (path under the top-level model).
BLOCK_PATH_OVERRIDES: dict[str, str] = {}


def _num_layers(config) -> int:
    n = getattr(config, "num_hidden_layers", None)
    if n is None:
        raise ValueError(f"config of type {type(config).__name__} has no num_hidden_layers")
    return int(n)


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return (dotted path from `model`, the ModuleList of transformer blocks).

    The blocks are the `nn.ModuleList` under `model.base_model` whose length equals
    `config.num_hidden_layers`; the shallowest such list wins. Raises ValueError when none matches.
    """
    config = model.config
    override = BLOCK_PATH_OVERRIDES.get(getattr(config, "model_type", ""))
    if override:
        return override, model.get_submodule(override)
    n = _num_layers(config)
    base = getattr(model, "base_model", model)
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
