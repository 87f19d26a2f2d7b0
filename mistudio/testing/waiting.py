"""Waiting without sleeping blindly: poll a condition with a deadline; run work in a thread."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


def wait_for(predicate: Callable[[], object], timeout: float = 180.0, every: float = 0.01):
    """Poll `predicate` until it returns something truthy (returned); fail after `timeout` s.

    The default deadline is generous on purpose: a busy 2-core machine may take minutes where an
    idle one takes a second, and a test must not depend on the machine's speed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"condition not met within {timeout}s")


def in_thread(fn: Callable, *args) -> threading.Thread:
    """Start `fn(*args)` in a daemon thread (a worker running beside the test); return it."""
    thread = threading.Thread(target=fn, args=args, daemon=True)
    thread.start()
    return thread
