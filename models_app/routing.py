"""Websocket routes of the Models panel (mounted by mistudio.routing)."""

from django.urls import path

from .consumers import ModelsConsumer

websocket_urlpatterns = [path("ws/models/", ModelsConsumer.as_asgi())]
