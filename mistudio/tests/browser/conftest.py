"""The browser fixtures of models_app, for the project-wide pages."""

from models_app.tests.browser.conftest import live, page  # noqa: F401
