"""Websocket routes: each app's `routing.websocket_urlpatterns`, named by dotted path the way
`include()` names an app's URLconf, so the project's wiring never imports an app."""

from importlib import import_module

APPS_ROUTING = ("models_app.routing", "datasets_app.routing")


def ws_include(module: str) -> list:
    """The websocket_urlpatterns of `module`."""
    return list(import_module(module).websocket_urlpatterns)


websocket_urlpatterns = [route for module in APPS_ROUTING for route in ws_include(module)]
