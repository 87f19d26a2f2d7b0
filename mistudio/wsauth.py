"""Websocket login gate, the counterpart of LoginRequiredWhenEnabled for HTTP."""

from __future__ import annotations

from channels.security.websocket import WebsocketDenier
from django.conf import settings


class LoginRequiredWebsocket:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        user = scope.get("user")
        if settings.LOGIN_REQUIRED and not (user and user.is_authenticated):
            denier = WebsocketDenier()
            return await denier(scope, receive, send)
        return await self.app(scope, receive, send)
