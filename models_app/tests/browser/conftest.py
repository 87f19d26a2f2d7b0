"""Browser fixtures: Debian's chromium driven by Playwright against a live stack.

Every page a test opens is watched: a console error, an uncaught exception, a request that fails
on the network, or an HTTP error answer fails the test at teardown, whatever it asserted. A
refusal the test provokes on purpose (a 4xx the API is meant to answer) is declared with
`page_watch.expect_refusal(path, status)`, and then only that answer to that path is accepted.
A request the browser aborts because its page was left (a link followed mid-poll) is not a
failure: nothing waits for its answer any more."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from urllib.parse import urlsplit

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


@dataclass
class PageWatch:
    """What went wrong in the browser during a test: console errors, page errors, failed
    requests and HTTP error answers, minus the refusals the test declared."""

    problems: list[str] = field(default_factory=list)
    refusals: set[tuple[str, int]] = field(default_factory=set)
    navigations: int = 0  # documents the main frame has asked for
    started_in: dict = field(default_factory=dict)  # request -> `navigations` when it started

    def expect_refusal(self, path: str, status: int) -> None:
        """The test provokes `status` from `path` (e.g. a refused download): not a failure."""
        self.refusals.add((path, status))

    def _expected(self, url: str, status: int | None) -> bool:
        path = urlsplit(url).path
        return any(p == path and (status is None or s == status) for p, s in self.refusals)

    def on_console(self, msg) -> None:
        if msg.type != "error":
            return
        url = (msg.location or {}).get("url", "")
        # Chromium logs every HTTP error answer as "Failed to load resource: …status of N";
        # the answer itself is checked in on_response.
        if msg.text.startswith("Failed to load resource: the server responded") and url:
            return
        self.problems.append(f"console error: {msg.text} ({url})")

    def on_page_error(self, error) -> None:
        self.problems.append(f"uncaught exception: {error}")

    def on_request(self, request) -> None:
        if request.is_navigation_request() and request.frame.parent_frame is None:
            self.navigations += 1  # the page is being left for another document
        self.started_in[request] = self.navigations

    def on_request_failed(self, request) -> None:
        started = self.started_in.pop(request, self.navigations)
        if request.failure == "net::ERR_ABORTED" and started < self.navigations:
            return  # its document was left (a link was followed): nobody waits for the answer
        self.problems.append(f"request failed: {request.method} {request.url} ({request.failure})")

    def on_response(self, response) -> None:
        if response.status >= 400 and not self._expected(response.url, response.status):
            self.problems.append(
                f"HTTP {response.status}: {response.request.method} {response.url}"
            )

    def watch(self, page) -> None:
        page.on("console", self.on_console)
        page.on("pageerror", self.on_page_error)
        page.on("request", self.on_request)
        page.on("requestfailed", self.on_request_failed)
        page.on("response", self.on_response)


@pytest.fixture
def live(hub, transactional_db):
    from django_q.brokers import get_broker

    for cluster in ("mistudio", "gpu"):  # no leftovers from other tests in the queues
        get_broker(cluster).purge_queue()
    with LiveStack(hub.endpoint) as stack:
        yield stack


@pytest.fixture
def page_watch() -> PageWatch:
    return PageWatch()


@pytest.fixture
def browser_context(live):
    """A chromium context on the live stack; every page opened in it is watched."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        context = browser.new_context(base_url=live.url)
        yield context
        browser.close()


@pytest.fixture
def page(browser_context, page_watch):
    """A watched page: the test fails at teardown if the browser reported any problem."""
    browser_context.on("page", page_watch.watch)  # this page and any popup it opens
    pg = browser_context.new_page()
    pg.set_default_timeout(120_000)  # a busy machine; waits end as soon as the page is there
    yield pg
    if page_watch.problems:
        pytest.fail("the browser reported problems:\n" + "\n".join(page_watch.problems))
