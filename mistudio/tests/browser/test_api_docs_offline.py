"""The app serves every asset itself: the API docs render with the network beyond 127.0.0.1
blocked, with no console error and no failed request."""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def test_api_docs_render_offline(page, live):
    blocked: list[str] = []

    def only_loopback(route):
        if urlsplit(route.request.url).hostname == "127.0.0.1":
            route.continue_()
        else:
            blocked.append(route.request.url)
            route.abort()

    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("requestfailed", lambda r: errors.append(f"failed: {r.url}"))
    page.route("**/*", only_loopback)
    page.goto("/api/docs")
    page.locator(".swagger-ui .title", has_text="miStudio API").wait_for()
    page.locator(".opblock-summary-path", has_text="/api/models/download").first.wait_for()
    assert blocked == [] and errors == []


def test_every_page_has_an_icon_the_app_serves(page, live):
    page.goto("/models/")
    href = page.locator("link[rel=icon]").get_attribute("href")
    assert page.request.get(live.url + href).ok
    assert page.request.get(live.url + "/favicon.ico").ok
