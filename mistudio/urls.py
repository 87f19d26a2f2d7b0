from django.contrib import admin
from django.templatetags.static import static
from django.urls import include, path
from django.views.generic import RedirectView

from mistudio.api import api

urlpatterns = [
    path("", RedirectView.as_view(pattern_name="models:page", permanent=False)),
    path("favicon.ico", RedirectView.as_view(url=static("favicon.svg"), permanent=True)),
    path("models/", include("models_app.urls")),
    path("templates/", include("templates_app.urls")),
    path("datasets/", include("datasets_app.urls")),
    path("api/", api.urls),
    path("admin/", admin.site.urls),
]
