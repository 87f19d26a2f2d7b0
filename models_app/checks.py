"""System checks: refuse to serve beyond loopback without login."""

from __future__ import annotations

from django.conf import settings
from django.core.checks import Error, register

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def serving_is_safe(host: str, login_required: bool) -> bool:
    return host in LOOPBACK or login_required


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
