"""What a result depends on besides its inputs: the installed library versions (manifest)."""

from __future__ import annotations

import importlib.metadata

LIBRARIES = ("torch", "transformers", "tokenizers", "safetensors", "accelerate", "bitsandbytes",
             "optimum-quanto")  # fmt: skip


def library_versions() -> dict[str, str | None]:
    """Installed versions of the libraries a result depends on (None: not installed)."""
    found = {}
    for name in LIBRARIES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found
