"""Shared fixtures: a loopback fake Hugging Face Hub, per-test data dir and HF cache."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")  # before huggingface_hub is imported

import pytest  # noqa: E402
from hypothesis import settings as hypothesis_settings  # noqa: E402

from mistudio.testing.backends import backend_problems  # noqa: E402
from mistudio.testing.fakehub import FakeHub  # noqa: E402

GOOD_TOKEN = "hf_validtoken1234567890"

# CI draws the same inputs every run (a failure there is reproducible, never luck); local runs
# draw new ones. HYPOTHESIS_PROFILE=ci gives a local run CI's inputs.
hypothesis_settings.register_profile("ci", derandomize=True, database=None)
hypothesis_settings.load_profile(
    os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") == "true" else "default")
)


@pytest.fixture(scope="session", autouse=True)
def backends_claimed(django_db_blocker):
    """A phase of scripts/test names its backends (MISTUDIO_TEST_BACKEND); stop the run before
    its first test when the database, broker or channel layer is not that one."""
    expected = os.environ.get("MISTUDIO_TEST_BACKEND")
    if expected:
        with django_db_blocker.unblock():
            problems = backend_problems(expected)
        if problems:
            pytest.exit(f"not the {expected} backends: {'; '.join(problems)}", returncode=3)


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
    fake_hub.on_body(None)
    fake_hub.truth()
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
