"""Where a dataset's files live: `<DATASETS_DIR>/<id>/`, ending as one `texts.jsonl`."""

from __future__ import annotations

import shutil
from pathlib import Path

from django.conf import settings

from .formats import TEXTS_FILE


def dataset_dir(dataset_id: str) -> Path:
    """The folder holding one dataset's files."""
    return Path(settings.DATASETS_DIR) / dataset_id


def texts_path(dataset_id: str) -> Path:
    """The normalized file: one JSON string per line."""
    return dataset_dir(dataset_id) / TEXTS_FILE


def files_remove(dataset_id: str) -> None:
    shutil.rmtree(dataset_dir(dataset_id), ignore_errors=True)
