"""ASGI entry point: HTTP through Django, websockets through Channels (same-origin only)."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mistudio.settings")
django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402

from mistudio.routing import websocket_urlpatterns  # noqa: E402
from mistudio.wsauth import LoginRequiredWebsocket, SameOriginWebsocket  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        # scheme, host and port of the Origin must match the socket's own (or a trusted origin)
        "websocket": SameOriginWebsocket(
            AuthMiddlewareStack(LoginRequiredWebsocket(URLRouter(websocket_urlpatterns)))
        ),
    }
)
