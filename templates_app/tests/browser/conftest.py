"""Browser fixtures: the models app's `page` (Playwright + Debian's chromium), against a live
daphne without the django-q2 clusters: the templates section enqueues nothing, and a cluster
takes its full shutdown grace to stop."""

from __future__ import annotations

import pytest

from mistudio.testing.live import LiveStack
from models_app.tests.browser.conftest import browser_context, page, page_watch  # noqa: F401


class WebOnly(LiveStack):
    def start_cluster(self, name: str) -> None:
        pass


@pytest.fixture
def live(hub, transactional_db):
    with WebOnly(hub.endpoint) as stack:
        yield stack
