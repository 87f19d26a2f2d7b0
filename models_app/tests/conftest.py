"""Fixtures shared by the models tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from mistudio.testing.hub_shapes import SHAPES, build_shape


@pytest.fixture(scope="session")
def shapes(fake_hub, tmp_path_factory) -> dict[str, Path]:
    """Every real-Hub shape (mistudio.testing.hub_shapes) built once and published on the
    session's fake hub; repo id → folder."""
    root = tmp_path_factory.mktemp("hub-shapes")
    folders = {repo_id: build_shape(repo_id, root) for repo_id in SHAPES}
    for repo_id, folder in folders.items():
        fake_hub.add_repo(repo_id, folder)
    return folders
