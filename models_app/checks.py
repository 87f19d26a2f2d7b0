"""System checks: refuse to serve beyond loopback without login."""

from __future__ import annotations

from django.conf import settings
from django.core.checks import Error, register
from django.db import connection
from django.db.migrations.executor import MigrationExecutor

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
LOOPBACK_HOST_NAMES = LOOPBACK | {"[::1]"}


def serving_is_safe(host: str, login_required: bool) -> bool:
    return host in LOOPBACK or login_required


def migrations_pending() -> list[str]:
    """Names ("app.0002_name") of the migrations the database has not applied yet."""
    executor = MigrationExecutor(connection)
    plan = executor.migration_plan(executor.loader.graph.leaf_nodes())
    return [f"{m.app_label}.{m.name}" for m, _backwards in plan]


@register()
def bind_requires_login(app_configs, **kwargs):
    if serving_is_safe(settings.BIND_HOST, settings.LOGIN_REQUIRED):
        return []
    return [
        Error(
            f"MISTUDIO_HOST={settings.BIND_HOST} serves beyond this machine without login.",
            hint="Set MISTUDIO_LOGIN_REQUIRED=1 (and create users with createsuperuser), or bind"
            " 127.0.0.1.",
            id="mistudio.E001",
        )
    ]


@register()
def public_names_require_login(app_configs, **kwargs):
    """A host name beyond loopback in ALLOWED_HOSTS means other machines reach the app (through
    a reverse proxy, even while daphne binds 127.0.0.1): that needs login too."""
    public = [h for h in settings.ALLOWED_HOSTS if h not in LOOPBACK_HOST_NAMES]
    if not public or settings.LOGIN_REQUIRED:
        return []
    return [
        Error(
            f"DJANGO_ALLOWED_HOSTS={','.join(public)} lets other machines in without login.",
            hint="Set MISTUDIO_LOGIN_REQUIRED=1 (and create users with createsuperuser).",
            id="mistudio.E002",
        )
    ]
