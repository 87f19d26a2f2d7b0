from django.urls import path

from . import views

app_name = "templates"

urlpatterns = [
    path("section", views.template_section, name="section"),
    path("save", views.template_save, name="save"),
    path("export", views.templates_export_file, name="export"),
    path("import", views.templates_import_file, name="import"),
    path("<str:template_id>/delete", views.template_delete, name="delete"),
    path("<str:template_id>/favorite", views.template_favorite, name="favorite"),
]
