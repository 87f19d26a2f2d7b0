"""What the server sends while a page's websocket is down is lost; the page asks for a resync
when it connects again and shows the rows as they are now: a card changed meanwhile, a card
whose row is gone, a row created meanwhile. The first connection is intercepted (Playwright's
WebSocket routing: the page sees an open socket the server never hears) and then closed."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from django.utils import timezone

from datasets_app.models import Dataset
from models_app.models import Model

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]
LONG_AGO = timedelta(hours=1)


class FirstSocketLost:
    """Routes the page's websocket to `path`: the first connection reaches nothing (what the
    server sends is lost), every later one reaches the server."""

    def __init__(self, page, path: str):
        self.routes: list = []
        page.route_web_socket(re.compile(re.escape(path) + "$"), self._route)

    def _route(self, ws) -> None:
        if self.routes:
            ws.connect_to_server()
        self.routes.append(ws)

    def drop(self) -> None:
        """Close the lost connection as a restarting server does (1012): the page reconnects,
        this time to the server."""
        self.routes[0].close(code=1012, reason="service restart")


def _error_row(cls, i: int, **fields):
    row = cls.objects.create(status="error", error_message=f"failure {i}", **fields)
    cls.objects.filter(pk=row.pk).update(updated_at=timezone.now() - LONG_AGO)
    return row


def test_the_models_page_catches_up_after_its_socket_came_back(page, live):
    changed, gone = (_error_row(Model, i, name=f"m{i}", hf_repo_id=f"o/m{i}", quantization="Q4")
                     for i in range(2))  # fmt: skip
    socket = FirstSocketLost(page, "/ws/models/")
    page.goto("/models/")
    page.get_by_text("API Connected").wait_for()
    page.locator(f"#model-{gone.pk}").wait_for()
    # meanwhile, in other processes: a change, a deletion, a new row (their messages are lost)
    Model.objects.filter(pk=changed.pk).update(error_message="changed while away",
                                               updated_at=timezone.now())  # fmt: skip
    Model.objects.filter(pk=gone.pk).delete()
    new = _error_row(Model, 2, name="m2", hf_repo_id="o/m2", quantization="Q8")
    Model.objects.filter(pk=new.pk).update(updated_at=timezone.now())
    assert len(socket.routes) == 1  # the page's socket was routed before it opened
    socket.drop()
    page.locator(f"#model-{changed.pk}", has_text="changed while away").wait_for()
    page.locator(f"#model-{new.pk}", has_text="failure 2").wait_for()
    page.locator(f"#model-{gone.pk}").wait_for(state="detached")
    assert len(socket.routes) >= 2


def test_the_datasets_page_catches_up_after_its_socket_came_back(page, live):
    changed, gone = (_error_row(Dataset, i, name=f"d{i}", source="upload") for i in range(2))
    socket = FirstSocketLost(page, "/ws/datasets/")
    page.goto("/datasets/")
    page.get_by_text("API Connected").wait_for()
    page.locator(f"#dataset-{gone.pk}").wait_for()
    Dataset.objects.filter(pk=changed.pk).update(error_message="changed while away",
                                                 updated_at=timezone.now())  # fmt: skip
    Dataset.objects.filter(pk=gone.pk).delete()
    assert len(socket.routes) == 1  # the page's socket was routed before it opened
    socket.drop()
    page.locator(f"#dataset-{changed.pk}", has_text="changed while away").wait_for()
    page.locator(f"#dataset-{gone.pk}").wait_for(state="detached")
