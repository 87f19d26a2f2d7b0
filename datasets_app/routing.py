"""Websocket routes of the Datasets panel (mounted by mistudio.routing)."""

from django.urls import path

from .consumers import DatasetsConsumer

websocket_urlpatterns = [path("ws/datasets/", DatasetsConsumer.as_asgi())]
