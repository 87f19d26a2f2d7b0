"""GPU-worker steps for models: the load check after a download, load, unload, the cache.

These run in the one-worker GPU cluster, which owns the process-wide `MODEL_CACHE` (at most one
model resident per device). `is_loaded` on the row mirrors that cache.
"""

from __future__ import annotations

import logging

import torch
from django.utils import timezone

from mistudio.errors import Conflict, ServiceError

from .jobs import LOADING, WAITING_GPU, job_cancelled, job_fail
from .ml.architecture import describe
from .ml.cache import MODEL_CACHE
from .ml.configs import ConfigError
from .ml.extensions import extensions_built
from .ml.loading import LoadReport, QuantizationError, load_model
from .models import Model, ModelStatus
from .selectors import device, model_get

log = logging.getLogger(__name__)

COMPILING = (
    "compiling optimum-quanto's extension for 2-bit (first Q2 load only; minutes on a small"
    " machine — `python -m models_app.ml.extensions` builds it ahead)"
)


def _load(row: Model, *, in_worker: bool = True):
    dev = device()

    def loader():
        return load_model(row.local_path, row.quantization, dev)

    (model, report), evicted = MODEL_CACHE.get(row.pk, str(dev), loader)
    if evicted and in_worker:
        Model.objects.filter(pk__in=evicted).update(is_loaded=False, updated_at=timezone.now())
        for pk in evicted:
            Model.announce(pk)
    return model, report


def model_resident(model_id: str, *, in_worker: bool = True):
    """Return (torch model, LoadReport) for a ready model, loading it into this process's cache
    if needed. `is_loaded` mirrors the GPU worker's cache only: a command-line run
    (`in_worker=False`) loads the model for itself and leaves the row as it is."""
    row = model_get(model_id)
    if row.status != ModelStatus.READY:
        raise Conflict(f"{row.hf_repo_id} is {row.status}, not ready.")
    model, report = _load(row, in_worker=in_worker)
    if in_worker and not row.is_loaded:
        Model.touch(row.pk, is_loaded=True, loaded_device=report.device)
    return model, report


def load_failure_message(quantization: str, exc: BaseException) -> str:
    """What the user reads when a load fails: the real cause, never a guess. Errors we raise
    (QuantizationError, ConfigError, a missing file) carry a readable message; anything else is
    named by its type, and a real out-of-memory says so."""
    if isinstance(exc, torch.OutOfMemoryError | MemoryError):
        return (
            f"Loading at {quantization} ran out of memory on the device; try a smaller"
            " quantization or free the device."
        )
    if isinstance(exc, QuantizationError | ConfigError | OSError):
        return f"Loading at {quantization} failed: {exc}"
    if "mismatched_sizes" in str(exc) or "size mismatch" in str(exc):
        return (
            f"Loading at {quantization} failed: the weights in the repo do not have the shapes"
            " its config.json describes."
        )
    log.error("load check failed", exc_info=exc)
    detail = str(exc).splitlines()[0][:300] if str(exc) else ""
    return f"Loading at {quantization} failed: {type(exc).__name__}" + (
        f": {detail}" if detail else ""
    )


def _record(row: Model, report: LoadReport, arch: dict) -> dict:
    return dict(
        params=arch["parameters"],
        num_layers=arch["total_layers"],
        hidden_dim=arch["hidden_dimension"],
        num_heads=arch["attention_heads"],
        vocab_size=arch["config"].get("vocab_size"),
        max_position=arch["config"].get("max_position"),
        architecture=arch["config"].get("architecture", ""),
        dtype=report.compute_dtype,
        quant_backend=report.backend,
        mem_req_bytes=report.footprint_bytes,
        load_notice=report.notice,
        metadata={
            **(row.metadata or {}),  # the estimate made before download stays beside the facts
            "architecture": arch,
            "load": {
                "quantized_layers": report.quantized_layers,
                "linear_layers": report.linear_layers,
                "quantized_experts": report.quantized_experts,
                "load_seconds": round(report.load_seconds, 3),
                "device": report.device,
            },
        },
    )


def model_load_check_run(model_id: str, *, in_worker: bool = True) -> None:
    """Load the downloaded model with its quantization, verify it, record the real numbers.

    Ends `ready` (and resident in the GPU worker: `is_loaded`), `error` with the reason, or
    `cancelled`. A command-line run (`in_worker=False`) frees the model afterwards."""
    if not Model.claim(
        model_id,
        from_status=ModelStatus.QUANTIZING,
        where={"phase": WAITING_GPU},
        phase="loading with quantization",
    ):
        return
    row = Model.objects.get(pk=model_id)
    if row.quantization == "Q2" and not extensions_built():
        Model.touch(model_id, phase=COMPILING)
    try:
        with Model.heartbeat(model_id):
            model, report = _load(row, in_worker=in_worker)
            arch = describe(model)
    except Exception as exc:  # noqa: BLE001 - any failure ends the row now, with its real cause
        MODEL_CACHE.evict(model_id)
        job_fail(model_id, load_failure_message(row.quantization, exc))
        return
    ready = Model.advance(
        model_id,
        from_status=ModelStatus.QUANTIZING,
        status=ModelStatus.READY,
        progress=100.0,
        phase="",
        speed_bps=0,
        eta_seconds=None,
        is_loaded=in_worker,
        loaded_device=report.device if in_worker else "",
        **_record(row, report, arch),
    )
    if not (ready and in_worker):
        MODEL_CACHE.evict(model_id)
    if not ready and Model.stopped_in(model_id, ModelStatus.QUANTIZING):
        job_cancelled(row)


def model_load_run(model_id: str) -> None:
    """Load a ready model (a second delivery finds it resident); a model deleted or no longer
    ready by the time the worker gets here is skipped. The card's phase says what happens and
    is cleared at the end, whatever the outcome."""
    Model.objects.filter(pk=model_id, status=ModelStatus.READY).update(phase=LOADING)
    Model.announce(model_id)
    try:
        model_resident(model_id)
    except ServiceError as exc:
        log.info("load skipped: %s", exc.message)
    finally:
        Model.objects.filter(pk=model_id, status=ModelStatus.READY).update(phase="")
        Model.announce(model_id)


def model_unload_run(model_id: str) -> None:
    MODEL_CACHE.evict(model_id)
    Model.objects.filter(pk=model_id, status=ModelStatus.READY).update(phase="")
    Model.touch(model_id, is_loaded=False, loaded_device="")


def cache_reset() -> None:
    """A fresh worker holds nothing: clear every `is_loaded` flag (called at GPU worker start)."""
    MODEL_CACHE.clear()
    Model.objects.filter(is_loaded=True).update(is_loaded=False, updated_at=timezone.now())
    # a Load or Unload the previous worker left half-way says nothing any more
    Model.objects.filter(status=ModelStatus.READY).exclude(phase="").update(
        phase="", updated_at=timezone.now()
    )
