"""Pick the compute device and describe its memory (no Django)."""

from __future__ import annotations

import platform
from pathlib import Path

import psutil
import torch

DEVICE_SETTINGS = ("auto", "cpu", "cuda")  # and cpu:N, cuda:N (see DEVICE_PATTERN)
DEVICE_PATTERN = r"auto|cpu|cuda|(cpu|cuda):\d+"


def resolve_device(setting: str) -> torch.device:
    """Turn a device setting ("auto", "cpu", "cpu:N", "cuda" or "cuda:N") into a torch.device.

    "auto" gives cuda when a GPU is usable, else cpu. "cpu:N" is the CPU: indexed CPU devices
    name the GPU workers of a CPU-only machine (one worker per index), torch has one CPU device.
    Asking for cuda without one raises ValueError.
    """
    value = (setting or "auto").strip().lower()
    if value == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if value == "cpu" or (value.startswith("cpu:") and value[4:].isdigit()):
        return torch.device("cpu")
    if value == "cuda" or value.startswith("cuda:"):
        return _cuda_device(value)
    raise ValueError(f"unknown device setting {setting!r}: use auto, cpu, cuda or cuda:N")


def _cuda_device(value: str) -> torch.device:
    if not torch.cuda.is_available():
        raise ValueError(
            f"device {value!r} was asked for but CUDA is not available "
            f"(torch {torch.__version__}); set the device to 'auto' or 'cpu'"
        )
    device = torch.device(value)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"{value!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return device


def device_info(device: torch.device) -> dict:
    """Describe `device`: kind ("cpu"/"cuda"), name, and total/free/used memory in bytes.

    CUDA numbers come from `torch.cuda.mem_get_info` (the whole GPU, all processes); CPU numbers
    from the system's available and total RAM.
    """
    if device.type == "cuda":
        return _cuda_info(device)
    memory = psutil.virtual_memory()
    return _info("cpu", f"CPU: {cpu_model_name()}", memory.total, memory.available)


def _cuda_info(device: torch.device) -> dict:
    index = device.index if device.index is not None else torch.cuda.current_device()
    free, total = torch.cuda.mem_get_info(index)
    return _info("cuda", f"CUDA: {torch.cuda.get_device_name(index)}", total, free)


def _info(kind: str, name: str, total: int, free: int) -> dict:
    return {
        "kind": kind,
        "name": name,
        "total_bytes": int(total),
        "free_bytes": int(free),
        "used_bytes": int(total - free),
    }


def cpu_model_name() -> str:
    """The CPU's marketing name from /proc/cpuinfo, else what `platform` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.lower().startswith(("model name", "hardware")):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"
