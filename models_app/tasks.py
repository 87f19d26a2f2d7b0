"""django-q2 tasks: a thin interface that receives ids only and calls the services."""

from __future__ import annotations

from . import exports, extraction, jobs, reconcile, resident


def model_download_task(model_id: str) -> None:
    jobs.model_download_run(model_id)


def model_load_check_task(model_id: str) -> None:
    resident.model_load_check_run(model_id)


def model_load_task(model_id: str) -> None:
    resident.model_load_run(model_id)


def model_unload_task(model_id: str) -> None:
    resident.model_unload_run(model_id)


def reconcile_task() -> int:
    """Scheduled every minute: end stale model, extraction and dataset jobs."""
    return reconcile.reconcile_all()


def extraction_run_task(extraction_id: str) -> None:
    extraction.extraction_run(extraction_id)


def extraction_export_task(extraction_id: str) -> None:
    exports.extraction_export_run(extraction_id)
