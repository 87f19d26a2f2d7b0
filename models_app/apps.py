from django.apps import AppConfig


class ModelsAppConfig(AppConfig):
    name = "models_app"
    verbose_name = "Models"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from mistudio.realtime import relay_source_register

        from . import checks, signals  # noqa: F401  (registers system checks and signal handlers)
        from .relay import MODELS_SOURCE

        relay_source_register(MODELS_SOURCE)
