"""Helpers shared by the template tests (no mocks: they drive the real views, API and services)."""

from __future__ import annotations

import json

from templates_app import services
from templates_app.models import ExtractionTemplate

VALID = {
    "name": "residual_layers0-11_1000samples_1432",
    "description": "Early, middle and late residual stream",
    "layers": [0, 6, 11],
    "hook_types": ["residual", "mlp"],
    "max_samples": 1000,
    "batch_size": 32,
    "context_size": 128,
    "top_k_examples": 100,
    "is_favorite": False,
}


def make(name: str = "t", **fields) -> ExtractionTemplate:
    return services.template_create(**{**VALID, "name": name, **fields})


def send(client, method: str, url: str, data=None, **extra):
    body = data if isinstance(data, (bytes, str)) else json.dumps(data)
    return getattr(client, method)(url, body, content_type="application/json", **extra)


def snapshot() -> list[tuple]:
    """Every row, every field: equal snapshots mean nothing changed."""
    return list(ExtractionTemplate.objects.order_by("pk").values_list())
