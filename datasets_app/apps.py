from django.apps import AppConfig


class DatasetsAppConfig(AppConfig):
    name = "datasets_app"
    verbose_name = "Datasets"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from mistudio.realtime import relay_source_register

        from .relay import DATASETS_SOURCE

        relay_source_register(DATASETS_SOURCE)
