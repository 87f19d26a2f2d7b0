from django.urls import path

from models_app.consumers import ModelsConsumer

websocket_urlpatterns = [
    path("ws/models/", ModelsConsumer.as_asgi()),
]
