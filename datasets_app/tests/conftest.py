"""Dataset repos on the shared fake hub (published once per session) and upload helpers."""

from __future__ import annotations

import pytest

from .helpers import hub_catalogue


@pytest.fixture(scope="session")
def dataset_catalogue(fake_hub):
    for repo_id, (files, gated) in hub_catalogue().items():
        fake_hub.add_dataset(repo_id, files, gated=gated)
    return fake_hub


@pytest.fixture
def dhub(hub, dataset_catalogue):
    """The fake hub with the dataset repos, the app pointed at it."""
    return hub
