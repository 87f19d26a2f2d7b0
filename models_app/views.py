"""HTML views of the Models panel: parse → one service call → render (page or HTMX partial)."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_GET, require_POST
from pydantic import ValidationError

from mistudio.errors import ServiceError
from mistudio.validation import validation_message

from . import selectors, services
from .models import Quantization
from .schemas import AddCachedIn, DownloadIn, EstimateIn, RetryIn, SearchIn

PAGE = "models_app/models.html"


def _page_context(**extra) -> dict:
    return {
        "models": selectors.model_list(),
        "quantizations": Quantization.choices,
        "default_quantization": Quantization.Q4,
        **extra,
    }


def _partial(request: HttpRequest, name: str, context: dict, status: int = 200) -> HttpResponse:
    return render(request, f"{PAGE}#{name}", context, status=status)


def _error(request: HttpRequest, message: str, status: int, target: str) -> HttpResponse:
    """A 4xx with the message: HTMX swaps it into `target`; a plain request gets the page."""
    if request.htmx:
        response = _partial(request, "form_error", {"error": message}, status=status)
        response["HX-Retarget"] = target
        response["HX-Reswap"] = "innerHTML"
        return response
    return render(request, PAGE, _page_context(error=message), status=status)


@require_GET
def models_page(request: HttpRequest) -> HttpResponse:
    if request.htmx and not request.htmx.boosted:
        return _partial(request, "model_section", _page_context())
    return render(request, PAGE, _page_context())


@require_POST
def model_download(request: HttpRequest) -> HttpResponse:
    try:
        data = DownloadIn.model_validate(request.POST.dict())
        services.model_download(**data.model_dump())
    except ValidationError as exc:
        return _error(request, validation_message(exc), 422, "#download-error")
    except ServiceError as exc:
        return _error(request, exc.message, exc.status, "#download-error")
    if request.htmx:
        return _partial(request, "model_section", _page_context(), status=201)
    return redirect("models:page")


@require_POST
def model_estimate(request: HttpRequest) -> HttpResponse:
    if not request.POST.get("hf_repo_id", "").strip():
        # the as-you-type estimate of an emptied field (or one the download just cleared while
        # a keystroke's estimate was still waiting): nothing to estimate, nothing to refuse
        return HttpResponse("")
    try:
        data = EstimateIn.model_validate(request.POST.dict())
        estimate = services.model_estimate(**data.model_dump())
        estimate["selected"] = request.POST.get("quantization", "")
    except ValidationError as exc:
        return _error(request, validation_message(exc), 422, "#estimate")
    except ServiceError as exc:
        return _error(request, exc.message, exc.status, "#estimate")
    return _partial(request, "estimate", {"estimate": estimate})


def _card_or_page(request: HttpRequest, model_id: str, status: int = 200) -> HttpResponse:
    if request.htmx:
        model = selectors.model_card_get(model_id)
        return _partial(request, "model_card", {"model": model}, status=status)
    return redirect("models:page")


@require_GET
def model_card(request: HttpRequest, model_id: str) -> HttpResponse:
    try:
        return _card_or_page(request, model_id)
    except ServiceError as exc:
        return _error(request, exc.message, exc.status, f"#model-{model_id}-error")


def _card_action(action):
    @require_POST
    def view(request: HttpRequest, model_id: str) -> HttpResponse:
        try:
            action(model_id)
            return _card_or_page(request, model_id)
        except ServiceError as exc:
            return _error(request, exc.message, exc.status, f"#model-{model_id}-error")

    view.__name__ = f"model_{action.__name__}"
    return view


model_cancel = _card_action(services.model_cancel)


@require_POST
def model_retry(request: HttpRequest, model_id: str) -> HttpResponse:
    try:
        data = RetryIn.model_validate(request.POST.dict())
        services.model_retry(model_id, **data.model_dump())
        return _card_or_page(request, model_id)
    except ValidationError as exc:
        return _error(request, validation_message(exc), 422, f"#model-{model_id}-error")
    except ServiceError as exc:
        return _error(request, exc.message, exc.status, f"#model-{model_id}-error")


model_load = _card_action(services.model_load)
model_unload = _card_action(services.model_unload)


@require_POST
def model_delete(request: HttpRequest, model_id: str) -> HttpResponse:
    try:
        services.model_delete(model_id)
    except ServiceError as exc:
        return _error(request, exc.message, exc.status, f"#model-{model_id}-error")
    if request.htmx:
        return _partial(request, "model_section", _page_context())
    return redirect("models:page")


@require_GET
def model_architecture(request: HttpRequest, model_id: str) -> HttpResponse:
    try:
        model = selectors.model_get(model_id)
        arch = selectors.model_architecture(model_id)
    except ServiceError as exc:
        return _error(request, exc.message, exc.status, "#modal")
    context = {"model": model, "arch": arch}
    if request.htmx:
        return _partial(request, "architecture_modal", context)
    return render(request, PAGE, _page_context(modal="architecture", **context))


FIND = "models_app/find.html"


@require_GET
def hub_search(request: HttpRequest) -> HttpResponse:
    """The search box's results: Hub models matching ?q=, each with its fit per quantization."""
    query = request.GET.get("q", "")
    if not query.strip():
        return render(request, f"{FIND}#hub_results", {"search": None})
    try:
        data = SearchIn.model_validate({"q": query})
        search = selectors.hub_search(data.q)
    except ValidationError as exc:
        return render(
            request, f"{FIND}#hub_results", {"error": validation_message(exc)}, status=422
        )
    except ServiceError as exc:
        return render(request, f"{FIND}#hub_results", {"error": exc.message}, status=exc.status)
    return render(request, f"{FIND}#hub_results", {"search": search})


@require_GET
def cached_list(request: HttpRequest) -> HttpResponse:
    context = {"cached": selectors.cached_repos(), "quantizations": Quantization.choices}
    return render(request, f"{FIND}#cached_list", context)


@require_POST
def model_add_cached(request: HttpRequest) -> HttpResponse:
    try:
        data = AddCachedIn.model_validate(request.POST.dict())
        services.model_add_cached(**data.model_dump())
    except ValidationError as exc:
        return _error(request, validation_message(exc), 422, "#cached-error")
    except ServiceError as exc:
        return _error(request, exc.message, exc.status, "#cached-error")
    if request.htmx:
        return _partial(request, "model_section", _page_context(), status=201)
    return redirect("models:page")


@require_GET
def device_badge(request: HttpRequest) -> HttpResponse:
    return render(request, "shell.html#device_badge", {"device": selectors.device_summary()})
