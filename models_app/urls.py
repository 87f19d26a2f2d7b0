from django.urls import path

from . import views, views_extraction

app_name = "models"

urlpatterns = [
    path("", views.models_page, name="page"),
    path("download", views.model_download, name="download"),
    path("estimate", views.model_estimate, name="estimate"),
    path("device", views.device_badge, name="device"),
    path("search", views.hub_search, name="search"),
    path("cached", views.cached_list, name="cached"),
    path("cached/add", views.model_add_cached, name="add_cached"),
    path("<str:model_id>/card", views.model_card, name="card"),
    path("<str:model_id>/cancel", views.model_cancel, name="cancel"),
    path("<str:model_id>/retry", views.model_retry, name="retry"),
    path("<str:model_id>/delete", views.model_delete, name="delete"),
    path("<str:model_id>/load", views.model_load, name="load"),
    path("<str:model_id>/unload", views.model_unload, name="unload"),
    path("<str:model_id>/architecture", views.model_architecture, name="architecture"),
    path("<str:model_id>/extract", views_extraction.extract_modal, name="extract"),
    path("<str:model_id>/extract/start", views_extraction.extract_start, name="extract_start"),
    path("<str:model_id>/extract/sites", views_extraction.sites_check, name="sites_check"),
    path(
        "<str:model_id>/extract/estimate",
        views_extraction.extract_estimate,
        name="extract_estimate",
    ),
    path("<str:model_id>/extractions", views_extraction.extraction_history, name="extractions"),
    path(
        "extractions/<str:extraction_id>/cancel",
        views_extraction.extraction_cancel,
        name="extraction_cancel",
    ),
    path(
        "extractions/<str:extraction_id>/tokens",
        views_extraction.extraction_tokens,
        name="extraction_tokens",
    ),
    path(
        "extractions/<str:extraction_id>/export",
        views_extraction.extraction_export,
        name="extraction_export",
    ),
    path(
        "extractions/<str:extraction_id>/delete",
        views_extraction.extraction_delete,
        name="extraction_delete",
    ),
]
