"""Fixtures for the fault-injection and abuse tests: a live stack tuned for crashes, a small
filesystem, a canary token on the fake hub, and the figures the README quotes."""

from __future__ import annotations

import secrets
import subprocess
from collections import Counter

import pytest

from mistudio.testing.live import LiveStack
from mistudio.testing.queues import queues_purge

STALE_S = 5  # MISTUDIO_STALE_HEARTBEAT_S of the live stack: a dead worker's job is ended after it
TASK_TIMEOUT_S = 45  # every job of a test on `live` is small; only killed ones run long
TASK_RETRY_S = 50  # the ORM broker hands a dead worker's task out again after this
# 1 MiB shards: an extraction finishes its first shard after a few batches, whatever the speed.
CRASH_ENV = {
    "MISTUDIO_STALE_HEARTBEAT_S": str(STALE_S),
    "MISTUDIO_TASK_TIMEOUT": str(TASK_TIMEOUT_S),
    "MISTUDIO_TASK_RETRY_S": str(TASK_RETRY_S),
    "MISTUDIO_SHARD_MB": "1",
}
# Recovery tests: no periodic reconciler and no redelivery by the ORM broker while a test runs,
# so whatever ends or runs again a dead worker's job is the restarted worker's start-up. Their
# deadlines can then be as generous as a busy machine needs without losing what they prove.
RECOVERY_ENV = {
    **CRASH_ENV,
    "MISTUDIO_RECONCILE_MINUTES": "0",
    "MISTUDIO_TASK_TIMEOUT": "1800",
    "MISTUDIO_TASK_RETRY_S": "3600",
}

# Figures for the README's Reliability section, printed at the end of the run.
FIGURES: Counter = Counter()
MAXIMA: dict[str, float] = {}


def figure_max(name: str, value: float) -> None:
    MAXIMA[name] = max(MAXIMA.get(name, value), value)


def pytest_terminal_summary(terminalreporter):
    if not FIGURES and not MAXIMA:
        return
    terminalreporter.section("miStudio reliability figures")
    for name, value in sorted(FIGURES.items()):
        terminalreporter.write_line(f"{name}: {value}")
    for name, value in sorted(MAXIMA.items()):
        terminalreporter.write_line(f"{name}: {round(value, 1):g}")


def _live_stack(hub, env: dict):
    queues_purge()  # no leftovers from other tests in the queues
    with LiveStack(hub.endpoint, extra_env=env) as stack:
        yield stack
        for name in list(stack.procs):  # no graceful stop needed: it takes seconds per cluster
            stack.kill(name)


@pytest.fixture
def live(hub, transactional_db):
    """daphne + both clusters on the test DB, with a 5 s stale-heartbeat threshold."""
    yield from _live_stack(hub, CRASH_ENV)


@pytest.fixture
def live_recovery(hub, transactional_db):
    """The live stack of the recovery tests (RECOVERY_ENV): only a restarted worker's start-up
    ends or requeues a dead worker's jobs."""
    yield from _live_stack(hub, RECOVERY_ENV)


TEXTS_REPO = "tiny/texts"


@pytest.fixture(scope="session")
def texts_repo(fake_hub):
    """A small dataset repo on the fake hub: a train split of 40 lines in JSON Lines."""
    rows = "".join(f'{{"text": "line {i} of a small text dataset"}}\n' for i in range(40))
    fake_hub.add_dataset(TEXTS_REPO, {"data/train.jsonl": rows.encode()})
    return TEXTS_REPO


@pytest.fixture
def canary(hub):
    """A valid, approved access token that no code path should ever print or store in plain;
    plus a valid-but-unapproved one and an unknown one, for the refusal paths."""
    tokens = {
        "approved": "hf_canaryApproved" + secrets.token_hex(12),
        "unapproved": "hf_canaryUnapproved" + secrets.token_hex(12),
        "invalid": "hf_canaryInvalid" + secrets.token_hex(12),
    }
    hub.tokens |= {tokens["approved"], tokens["unapproved"]}
    hub.approved_tokens.add(tokens["approved"])
    yield tokens
    hub.tokens -= set(tokens.values())
    hub.approved_tokens.discard(tokens["approved"])


def _mount_tmpfs(target, size: str) -> bool:
    cmd = ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(target)]
    return subprocess.run(cmd, capture_output=True).returncode == 0


def _mount_loop(target, size_mb: int, image) -> bool:
    made = subprocess.run(
        ["dd", "if=/dev/zero", f"of={image}", "bs=1M", f"count={size_mb}"], capture_output=True
    )
    if made.returncode or subprocess.run(["mkfs.ext4", "-q", str(image)]).returncode:
        return False
    return subprocess.run(["mount", "-o", "loop", str(image), str(target)]).returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    """An 8 MiB filesystem (tmpfs, else a loop-mounted ext4 image); skipped where mounting
    needs privileges this process lacks."""
    target = tmp_path / "small-disk"
    target.mkdir()
    if not (_mount_tmpfs(target, "8m") or _mount_loop(target, 8, tmp_path / "disk.img")):
        pytest.skip("mounting a small filesystem needs root (mount tmpfs or a loop device)")
    yield target
    subprocess.run(["umount", "-l", str(target)], check=True)
