"""django-q2 tasks: a thin interface that receives dataset ids only and calls the jobs."""

from __future__ import annotations

from . import jobs, reconcile


def dataset_import_task(dataset_id: str) -> None:
    jobs.dataset_import_run(dataset_id)


def dataset_normalize_task(dataset_id: str) -> None:
    jobs.dataset_normalize_run(dataset_id)


def datasets_reconcile_task() -> int:
    return reconcile.datasets_reconcile()
