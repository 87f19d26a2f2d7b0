from django.apps import AppConfig


class TemplatesAppConfig(AppConfig):
    name = "templates_app"
    verbose_name = "Extraction templates"
    default_auto_field = "django.db.models.BigAutoField"
