"""Build optimum-quanto's native extensions ahead of time.

optimum-quanto compiles a C++ extension (and, on a CUDA machine, a CUDA one) the first time a
2-bit model is used: minutes on a small machine, during which a load shows no progress. Set-up
runs this module so no user and no test waits on a compiler:

    python -m models_app.ml.extensions        # needs g++ (and nvcc where CUDA is used)

It is idempotent: a built extension loads in well under a second.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import torch


def _quanto():
    """optimum-quanto's extension registry, imported on first use: the import brings torch's C++
    builder and setuptools (~0.2 s), which only a 2-bit model needs (a CLI starts faster)."""
    from optimum.quanto.library import extensions  # deferred on purpose

    return extensions


def extension_names() -> list[str]:
    """The extensions optimum-quanto uses on this machine: the CPU one, and CUDA's when usable."""
    names = ["quanto_cpp"]
    if torch.cuda.is_available() and _quanto().is_extension_available("quanto_cuda"):
        names.append("quanto_cuda")
    return names


def extensions_built() -> bool:
    """Whether every extension optimum-quanto needs here is already built for this torch (so a
    Q2 load will not start by compiling)."""
    for name in extension_names():
        ext = _quanto().get_extension(name)
        version_file = Path(ext.build_directory) / "pytorch_version.txt"
        if ext._lib is None and not (
            version_file.is_file() and version_file.read_text().strip() == torch.__version__
        ):
            return False
    return True


def extensions_load() -> bool:
    """Import each built extension's library directly into optimum-quanto (True when all were).

    optimum-quanto loads its extension through torch's JIT loader, which takes a lock file in
    the build folder for every process's first 2-bit use, even when nothing is to be built; a
    process killed in that moment (a crash, the OOM killer) leaves the lock behind and every later
    2-bit load in any process waits on it for ever. A built library needs no lock: it is imported
    as torch's loader would import it.
    """
    loaded = True
    for name in extension_names():
        ext = _quanto().get_extension(name)
        build = Path(ext.build_directory)
        library = build / f"{name}.so"
        version_file = build / "pytorch_version.txt"
        if ext._lib is not None:
            continue
        if not (library.is_file() and version_file.is_file()
                and version_file.read_text().strip() == torch.__version__):  # fmt: skip
            loaded = False
            continue
        spec = importlib.util.spec_from_file_location(name, library)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        ext._lib = module
    return loaded


def build_extensions() -> dict[str, float]:
    """Build (or load, when already built) each extension; returns seconds per extension.
    Raises what torch's builder raises (no compiler, a failed build)."""
    took = {}
    for name in extension_names():
        start = time.monotonic()
        if not extensions_load():
            _quanto().get_extension(name).lib  # noqa: B018 - the property compiles and loads the extension
        took[name] = time.monotonic() - start
    return took


def main() -> int:
    try:
        took = build_extensions()
    except Exception as exc:  # noqa: BLE001 - say what is missing, then fail set-up
        print(f"optimum-quanto's extension did not build: {exc}", file=sys.stderr)
        print("Q2 (2-bit) needs a C++ compiler (g++) to build it; install one and re-run.",
              file=sys.stderr)  # fmt: skip
        return 1
    for name, seconds in took.items():
        print(f"{name}: ready ({seconds:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
