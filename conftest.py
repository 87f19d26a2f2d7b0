"""Shared fixtures: a loopback fake Hugging Face Hub, per-test data dir and HF cache."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")  # before huggingface_hub is imported

import pytest  # noqa: E402

from mistudio.testing.fakehub import FakeHub  # noqa: E402

GOOD_TOKEN = "hf_validtoken1234567890"


@pytest.fixture(scope="session")
def fake_hub():
    with FakeHub() as hub:
        hub.add_catalogue()
        yield hub


@pytest.fixture
def hub(fake_hub, settings):
    """The fake hub, reset to full speed, with the app pointed at it."""
    fake_hub.set_rate(None)
    fake_hub.resume()
    settings.HF_ENDPOINT = fake_hub.endpoint
    yield fake_hub
    fake_hub.resume()
    fake_hub.set_rate(None)


@pytest.fixture(autouse=True)
def isolated_dirs(settings, tmp_path):
    """Every test gets its own data dir and HF cache; no model stays resident between tests."""
    settings.DATA_DIR = tmp_path / "data"
    settings.ACTIVATIONS_DIR = settings.DATA_DIR / "activations"
    settings.DATASETS_DIR = settings.DATA_DIR / "datasets"
    settings.MODELS_CACHE_DIR = tmp_path / "hf-cache"
    settings.DISK_MARGIN_BYTES = 1024 * 1024
    settings.DATA_DIR.mkdir(parents=True)
    yield
    from models_app.ml.cache import MODEL_CACHE

    MODEL_CACHE.clear()


@pytest.fixture(autouse=True)
def empty_task_queues(settings):
    """Tests enqueue tasks no cluster consumes; with the Redis broker they would outlive the test
    database, so every test starts from empty queues."""
    if settings.Q_CLUSTER.get("redis"):
        from django_q.brokers import get_broker

        for cluster in (settings.DOWNLOAD_CLUSTER, settings.GPU_CLUSTER):
            get_broker(cluster).purge_queue()
    yield
