"""The watch every browser test runs under sees what it must: a console error, an uncaught
exception, a failed request and an HTTP error answer, and accepts only a declared refusal."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def test_the_watch_sees_console_errors_exceptions_and_failed_requests(page, page_watch, live):
    page.goto("/models/")
    page.get_by_text("API Connected").wait_for()
    assert page_watch.problems == []  # the models page itself is clean
    page.evaluate("console.error('something broke')")
    page.evaluate("setTimeout(() => { throw new Error('uncaught boom'); })")
    page.evaluate("fetch('/no-such-page/').catch(() => null)")
    page.evaluate("fetch('http://127.0.0.1:9/closed-port').catch(() => null)")
    page.wait_for_function("() => true")
    page.wait_for_timeout(500)  # let the events arrive (nothing is asserted on time)
    found = "\n".join(page_watch.problems)
    for needle in ("something broke", "uncaught boom", "HTTP 404", "request failed"):
        assert needle in found, found
    page_watch.problems.clear()

    # a request still running when the user follows a link is dropped by the browser: no failure
    page.evaluate("fetch('/models/device')")
    page.goto("/models/")
    page.get_by_text("API Connected").wait_for()
    assert page_watch.problems == []
    # but a request aborted while its page is still there is one
    page.evaluate(
        "const c = new AbortController(); fetch('/models/device', {signal: c.signal})"
        ".catch(() => null); c.abort();"
    )
    page.wait_for_timeout(500)
    assert any("request failed" in p for p in page_watch.problems), page_watch.problems
    page_watch.problems.clear()

    page_watch.expect_refusal("/no-such-page/", 404)
    page.evaluate("fetch('/no-such-page/')")
    page.evaluate("fetch('/another-missing-page/')")
    page.wait_for_timeout(500)
    assert page_watch.problems == [f"HTTP 404: GET {live.url}/another-missing-page/"]
    page_watch.problems.clear()
