"""The browser fixtures of models_app, for the project-wide pages."""

from models_app.tests.browser.conftest import (  # noqa: F401
    browser_context,
    live,
    page,
    page_watch,
)
