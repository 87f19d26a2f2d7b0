"""`{% load mistudio_format %}`: the humanize formats as template filters."""

from __future__ import annotations

from django import template

from mistudio import humanize

register = template.Library()

for _name in ("bytes_h", "params_h", "rate_h", "eta_h"):
    register.filter(_name, getattr(humanize, _name))


@register.filter
def python_str(value: object) -> str:
    """`value` as a Python string literal (for code snippets a user pastes)."""
    return repr(str(value))
