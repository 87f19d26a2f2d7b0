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

    def drop(self, code: int) -> None:
        """Close the lost connection with `code` (1012: a restarting server; 1000, 1001: a clean
        close, a server or proxy going away): the page reconnects, this time to the server."""
        self.routes[0].close(code=code, reason="going")


def _error_row(cls, i: int, **fields):
    row = cls.objects.create(status="error", error_message=f"failure {i}", **fields)
    cls.objects.filter(pk=row.pk).update(updated_at=timezone.now() - LONG_AGO)
    return row


PAGES = {  # row class, page, websocket, card id prefix, the fields of row i
    "models": (Model, "/models/", "/ws/models/", "model",
               lambda i: dict(name=f"m{i}", hf_repo_id=f"o/m{i}", quantization="Q4")),
    "datasets": (Dataset, "/datasets/", "/ws/datasets/", "dataset",
                 lambda i: dict(name=f"d{i}", source="upload")),
}  # fmt: skip


@pytest.mark.parametrize(("name", "code"), [("models", 1012), ("datasets", 1012),
                                            ("models", 1000), ("datasets", 1001)])  # fmt: skip
def test_a_page_catches_up_after_its_socket_came_back(page, live, name, code):
    cls, url, ws_path, prefix, fields = PAGES[name]
    changed, gone = (_error_row(cls, i, **fields(i)) for i in range(2))
    socket = FirstSocketLost(page, ws_path)
    page.goto(url)
    page.get_by_text("API Connected").wait_for()
    page.locator(f"#{prefix}-{gone.pk}").wait_for()
    # meanwhile, in other processes: a change, a deletion, a new row (their messages are lost)
    cls.objects.filter(pk=changed.pk).update(error_message="changed while away",
                                             updated_at=timezone.now())  # fmt: skip
    cls.objects.filter(pk=gone.pk).delete()
    new = _error_row(cls, 2, **fields(2))
    cls.objects.filter(pk=new.pk).update(updated_at=timezone.now())
    assert len(socket.routes) == 1  # the page's socket was routed before it opened
    socket.drop(code)
    page.locator(f"#{prefix}-{changed.pk}", has_text="changed while away").wait_for()
    page.locator(f"#{prefix}-{new.pk}", has_text="failure 2").wait_for()
    page.locator(f"#{prefix}-{gone.pk}").wait_for(state="detached")
    assert len(socket.routes) >= 2
