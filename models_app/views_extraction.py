"""HTML views for activation extraction: the modal, its size estimate, start, cancel, history,
delete, and the SAELens export of a completed extraction."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_GET, require_POST
from pydantic import ValidationError

from datasets_app.selectors import dataset_options
from mistudio import limits
from mistudio.errors import Conflict, ServiceError
from mistudio.validation import module_sites_from_text, module_sites_text, validation_message
from templates_app.selectors import section_context, template_get

from . import exports, extraction, inspection, selectors, sites
from .models import Model
from .schemas import ExtractionEstimateIn, ExtractionIn, SitesIn

MODAL = "models_app/extract.html"
TOKENS = "models_app/tokens.html"
HISTORY = "models_app/extractions.html"


def _default_form(model: Model) -> dict:
    n = model.num_layers or 1
    return {
        "dataset_id": "",
        "layers": sorted({0, n // 2, n - 1}),
        "hook_types": ["residual"],
        "module_sites": [],
        "batch_size": limits.DEFAULT_BATCH_SIZE,
        "max_samples": limits.DEFAULT_MAX_SAMPLES,
        "context_size": extraction.default_context_size(model),
        "special_tokens": limits.DEFAULT_SPECIAL_TOKENS,
        "output_format": limits.DEFAULT_OUTPUT_FORMAT,
    }


def _template_form(model: Model, template_id: str) -> tuple[dict, list[str]]:
    """The form filled from a template, fitted to this model, and a sentence for each thing
    that did not fit (layers the model lacks, a context longer than its positions)."""
    template = template_get(template_id)
    values = template.extraction_settings()
    form = _default_form(model)
    n = model.num_layers or 0
    context = values["context_size"]
    kept = [i for i in values["layers"] if i < n]
    dropped = [i for i in values["layers"] if i >= n]
    form.update(
        values,
        layers=kept or form["layers"],
        context_size=min(context, model.max_position or context),
    )
    notes = []
    if dropped:
        which = ", ".join(f"L{i}" for i in dropped)
        notes.append(
            f"“{template.name}” names layer{'s' if len(dropped) > 1 else ''} {which}, which"
            f" {model.name} does not have ({n} layers: L0–L{n - 1}); "
            + ("dropped." if kept else "none is left, so the default layers are selected.")
        )
    if form["context_size"] < context:
        notes.append(
            f"Context size {context} is longer than {model.name}'s {model.max_position} positions;"
            f" set to {form['context_size']}."
        )
    return form, notes


def _posted_form(request: HttpRequest) -> dict:
    post = request.POST
    return {
        "dataset_id": post.get("dataset_id", ""),
        "layers": post.getlist("layers"),
        "hook_types": post.getlist("hook_types"),
        "module_sites": module_sites_from_text(post.get("module_sites")),
        "batch_size": post.get("batch_size") or limits.DEFAULT_BATCH_SIZE,
        "max_samples": post.get("max_samples") or limits.DEFAULT_MAX_SAMPLES,
        "context_size": post.get("context_size") or None,
        "special_tokens": post.get("special_tokens") or limits.DEFAULT_SPECIAL_TOKENS,
        "output_format": post.get("output_format") or limits.DEFAULT_OUTPUT_FORMAT,
    }


def _modal_context(model: Model, form: dict, *, templates_open: bool = False, **extra) -> dict:
    return {
        "model": model,
        "model_id": model.pk,
        "form": form,
        "module_sites_text": module_sites_text(
            [s for s in form.get("module_sites") or [] if isinstance(s, dict)]
        ),
        "layer_range": range(model.num_layers or 0),
        "hook_choices": list(limits.HOOK_LABELS.items()),
        "special_token_choices": list(limits.SPECIAL_TOKENS_LABELS.items()),
        "output_format_choices": list(limits.OUTPUT_FORMAT_LABELS.items()),
        "datasets": dataset_options(),
        "limits": limits,
        "template_section": section_context(open=templates_open),
        **extra,
    }


@require_GET
def extract_modal(request: HttpRequest, model_id: str) -> HttpResponse:
    try:
        model = selectors.model_get(model_id)
        if not model.is_ready:
            raise Conflict(f"{model.hf_repo_id} is {model.status}, not ready.")
        template_id = request.GET.get("template")
        form, notes = (
            _template_form(model, template_id) if template_id else (_default_form(model), [])
        )
    except ServiceError as exc:
        return HttpResponse(exc.message, status=exc.status, content_type="text/plain")
    context = _modal_context(
        model,
        form,
        templates_open=request.GET.get("templates") == "open",
        loaded_template=template_id,
        template_notes=notes,
    )
    if request.htmx:
        return render(request, f"{MODAL}#extract_modal", context)
    return render(request, MODAL, context)


def _start_error(request: HttpRequest, model: Model, message: str, status: int) -> HttpResponse:
    if request.htmx:
        response = render(
            request, "models_app/models.html#form_error", {"error": message}, status=status
        )
        response["HX-Retarget"] = "#extract-error"
        response["HX-Reswap"] = "innerHTML"
        return response
    context = _modal_context(model, _posted_form(request), error=message)
    return render(request, MODAL, context, status=status)


@require_POST
def extract_start(request: HttpRequest, model_id: str) -> HttpResponse:
    try:
        model = selectors.model_get(model_id)
    except ServiceError as exc:
        return HttpResponse(exc.message, status=exc.status, content_type="text/plain")
    try:
        data = ExtractionIn.model_validate(_posted_form(request))
        job = extraction.extraction_start(model_id=model.pk, **data.model_dump())
    except ValidationError as exc:
        return _start_error(request, model, validation_message(exc), 422)
    except ServiceError as exc:
        return _start_error(request, model, exc.message, exc.status)
    if request.htmx:
        # The modal stays open on its "Extracting…" box, which the websocket keeps current (as it
        # does the card); the box lives in the modal, so the target exists whatever the page.
        response = render(request, f"{MODAL}#extraction_box", {"job": job}, status=202)
        response["HX-Retarget"] = "#extract-status"
        response["HX-Reswap"] = "innerHTML"
        return response
    return redirect("models:extractions", model_id=model_id)


def _history_context(model: Model) -> dict:
    jobs = list(selectors.extraction_list(model_id=model.pk))
    exporting = any(j.saelens_export and j.saelens_export.is_active for j in jobs)
    return {"model": model, "jobs": jobs, "has_active": exporting or any(j.is_active for j in jobs)}


@require_GET
def extraction_history(request: HttpRequest, model_id: str) -> HttpResponse:
    try:
        model = selectors.model_get(model_id)
    except ServiceError as exc:
        return HttpResponse(exc.message, status=exc.status, content_type="text/plain")
    context = _history_context(model)
    if request.htmx:
        return render(request, f"{HISTORY}#history", context)
    return render(request, HISTORY, context)


def _job_action(action):
    @require_POST
    def view(request: HttpRequest, extraction_id: str) -> HttpResponse:
        try:
            job = selectors.extraction_get(extraction_id)
            action(extraction_id)
        except ServiceError as exc:
            return HttpResponse(exc.message, status=exc.status, content_type="text/plain")
        if request.htmx:
            return render(request, f"{HISTORY}#history", _history_context(job.model))
        return redirect("models:extractions", model_id=job.model_id)

    view.__name__ = action.__name__
    return view


extraction_cancel = _job_action(extraction.extraction_cancel)
extraction_delete = _job_action(extraction.extraction_delete)


@require_GET
def extraction_tokens(request: HttpRequest, extraction_id: str) -> HttpResponse:
    """The token view: the first sequences shaded by their activation norm at ?site=."""
    try:
        job = selectors.extraction_get(extraction_id)
        view = inspection.extraction_token_view(extraction_id, request.GET.get("site") or None)
    except ServiceError as exc:
        return HttpResponse(exc.message, status=exc.status, content_type="text/plain")
    context = {"job": job, "model": job.model, "view": view}
    if request.htmx:
        return render(request, f"{TOKENS}#tokens", context)
    return render(request, TOKENS, context)


@require_POST
def sites_check(request: HttpRequest, model_id: str) -> HttpResponse:
    """The modal's "Check sites": every site of the form with its module and shape, or why not."""
    form = _posted_form(request)
    try:
        data = SitesIn.model_validate(
            {k: form[k] for k in ("layers", "hook_types", "module_sites")}
        )
        found = sites.sites_check(model_id, **data.model_dump())
    except ValidationError as exc:
        return render(request, f"{MODAL}#sites", {"error": validation_message(exc)}, status=422)
    except ServiceError as exc:
        return render(request, f"{MODAL}#sites", {"error": exc.message}, status=exc.status)
    return render(request, f"{MODAL}#sites", {"sites": found})


@require_POST
def extract_estimate(request: HttpRequest, model_id: str) -> HttpResponse:
    """The modal's size line (HTMX, on every change of the form): the output size and the free
    disk, or what is missing to tell them. A form that is not complete yet is not an error: the
    line says what is missing (200), and Start stays disabled while it does not fit."""
    try:
        form = _posted_form(request)
        form["dataset_id"] = form["dataset_id"] or None
        data = ExtractionEstimateIn.model_validate(form)
        estimate = extraction.extraction_estimate(model_id, **data.model_dump())
    except ValidationError as exc:
        return render(request, f"{MODAL}#estimate", {"note": validation_message(exc)})
    except ServiceError as exc:
        return render(request, f"{MODAL}#estimate", {"note": exc.message})
    return render(request, f"{MODAL}#estimate", {"estimate": estimate})


@require_POST
def extraction_export(request: HttpRequest, extraction_id: str) -> HttpResponse:
    """Export for SAELens (a button on a completed extraction): queued in the background; the
    websocket then shows its progress and, at the end, the folder. 409 with the reason when it
    is not completed or already exported or exporting."""
    try:
        exports.extraction_export_start(extraction_id)
        job = selectors.extraction_get(extraction_id)
    except ServiceError as exc:
        return HttpResponse(exc.message, status=exc.status, content_type="text/plain")
    return render(request, f"{MODAL}#export_state", {"job": job}, status=202)
