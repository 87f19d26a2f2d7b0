"""The browser fixtures, for docs/screenshots.py."""

from models_app.tests.browser.conftest import (  # noqa: F401
    browser_context,
    live,
    page,
    page_watch,
)
