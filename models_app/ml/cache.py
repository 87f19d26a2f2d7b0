"""The loaded-model cache: at most `per_device` models resident on each device, LRU."""

from __future__ import annotations

import gc
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch


def _free_device_memory(device: str) -> None:
    gc.collect()
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()


class ModelCache:
    """Keeps loaded models by key; loading one on a device evicts the least recently used there."""

    def __init__(self, per_device: int = 1):
        self.per_device = per_device
        self._entries: OrderedDict[str, tuple[str, Any]] = OrderedDict()
        self._lock = threading.RLock()

    def get(self, key: str, device: str, loader: Callable[[], Any]) -> tuple[Any, list[str]]:
        """Return (the cached value, keys evicted to make room); call `loader()` on a miss."""
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key][1], []
            evicted = self._make_room(device)
            value = loader()
            self._entries[key] = (device, value)
            return value, evicted

    def _make_room(self, device: str) -> list[str]:
        on_device = [k for k, (d, _) in self._entries.items() if d == device]
        evicted = on_device[: max(0, len(on_device) - self.per_device + 1)]
        for key in evicted:
            del self._entries[key]
        if evicted:
            _free_device_memory(device)
        return evicted

    def evict(self, key: str) -> bool:
        with self._lock:
            entry = self._entries.pop(key, None)
        if entry is None:
            return False
        device = entry[0]
        del entry
        _free_device_memory(device)
        return True

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._entries)

    def clear(self) -> None:
        for key in self.keys():
            self.evict(key)


# One cache per process: the GPU worker holds the models it serves.
MODEL_CACHE = ModelCache(per_device=1)
