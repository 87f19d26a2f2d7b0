"""Browser fixtures: Debian's chromium driven by Playwright against a live stack."""

from __future__ import annotations

import os
import shutil

import pytest

from mistudio.testing.live import LiveStack

# Playwright's sync API runs an event loop in this thread; our DB reads from the test are plain
# synchronous calls, so Django's async-safety guard does not apply.
os.environ.setdefault("DJANGO_ALLOW_ASYNC_UNSAFE", "true")

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture
def live(hub, transactional_db):
    from django_q.brokers import get_broker

    for cluster in ("mistudio", "gpu"):  # no leftovers from other tests in the queues
        get_broker(cluster).purge_queue()
    with LiveStack(hub.endpoint) as stack:
        yield stack


@pytest.fixture
def page(live):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        context = browser.new_context(base_url=live.url)
        pg = context.new_page()
        pg.set_default_timeout(120_000)  # a busy machine; waits end as soon as the page is there
        yield pg
        browser.close()
