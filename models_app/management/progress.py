"""Run a job step in a thread of this process and follow its row with a tqdm bar (the CLI's
counterpart of the page's progress bar: it reads the same row the page reads)."""

from __future__ import annotations

import threading
from collections.abc import Callable

from tqdm import tqdm

POLL_SECONDS = 0.2


def run_with_bar(
    step: Callable[[], None], read: Callable[[], tuple[int, int, str]], **bar_options
) -> None:
    """Run `step()` in a thread; while it runs, `read()` → (done, total, phase) moves a tqdm bar
    (`bar_options`: unit, desc, …). Returns when the step has returned; an exception of the step
    is left to the step (jobs end their row in a state, they do not raise)."""
    worker = threading.Thread(target=step, daemon=True)
    worker.start()
    with tqdm(total=None, dynamic_ncols=True, **bar_options) as bar:
        started = False
        while worker.is_alive():
            worker.join(POLL_SECONDS)
            started = _advance(bar, *read(), started=started)
        _advance(bar, *read(), started=started)


def _advance(bar: tqdm, done: int, total: int, phase: str, *, started: bool) -> bool:
    """Move the bar; its clock starts at the first unit of work (the time a model takes to load
    before that is shown as the phase, and not counted in the rate). Returns `started`."""
    if done and not started:
        bar.reset(total=total or bar.total)  # the rate is then work / time spent working
        started = True
    elif total and bar.total != total:
        bar.total = total
        bar.refresh()
    if phase:
        bar.set_postfix_str(phase, refresh=False)
    bar.update(max(done - bar.n, 0))
    return started
