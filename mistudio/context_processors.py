"""Values every page's shell needs."""

from __future__ import annotations


def shell(request) -> dict:
    path = request.path
    tab = "datasets" if path.startswith("/datasets") else "models"
    return {"active_tab": tab}
