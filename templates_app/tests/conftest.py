import pytest
from django.test import Client


@pytest.fixture
def api():
    """A client that returns a server error as a 500 response instead of raising it, so tests
    can count 5xx answers."""
    return Client(raise_request_exception=False)
