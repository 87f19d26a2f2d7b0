from django.urls import path

from . import views

app_name = "datasets"

urlpatterns = [
    path("", views.datasets_page, name="page"),
    path("upload", views.dataset_upload, name="upload"),
    path("import", views.dataset_import, name="import"),
    path("<str:dataset_id>/card", views.dataset_card, name="card"),
    path("<str:dataset_id>/cancel", views.dataset_cancel, name="cancel"),
    path("<str:dataset_id>/delete", views.dataset_delete, name="delete"),
]
