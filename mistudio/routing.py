from django.urls import path

from datasets_app.consumers import DatasetsConsumer
from models_app.consumers import ModelsConsumer

websocket_urlpatterns = [
    path("ws/models/", ModelsConsumer.as_asgi()),
    path("ws/datasets/", DatasetsConsumer.as_asgi()),
]
