"""The README's screenshots (docs/img/*.png), taken from a live stack on the fake Hub.

Run: `python -m pytest docs/screenshots.py -p no:cacheprovider` then, if pngquant is there,
`pngquant --force --ext .png --quality 60-85 docs/img/*.png` (smaller files). Not part of the
suite (pytest collects test_*.py only); the page watch still fails a run with a console error.
"""

# ruff: noqa: F811  (the fixtures imported below are used by name as test parameters)
from __future__ import annotations

from pathlib import Path

import pytest

from models_app.models import ExtractionJob
from models_app.tests.browser.conftest import (  # noqa: F401  (the browser fixtures)
    browser_context,
    live,
    page,
    page_watch,
)
from models_app.tests.helpers import download, text_dataset, wait_for

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]
IMG = Path(__file__).parent / "img"


def shot(page, name: str, **kwargs) -> None:
    IMG.mkdir(exist_ok=True)
    page.wait_for_timeout(400)  # let transitions (bar widths) settle for the picture
    page.screenshot(path=str(IMG / f"{name}.png"), **kwargs)


def test_screenshots(page, live, hub):
    ready = download("tiny/llama-big", "FP16")
    text_dataset(name="stories", lines=["a long line of words for the tiny model " * 20] * 300)
    page.set_viewport_size({"width": 1200, "height": 820})
    page.goto("/models/")
    page.get_by_text("API Connected").wait_for()

    hub.set_rate(400_000)  # a download slow enough to be seen moving
    page.get_by_label("HuggingFace Model Repository").fill("tiny/gpt2")
    page.locator("#estimate .estimate-row").first.wait_for()
    page.get_by_label("Quantization Format").select_option("Q8")
    page.get_by_role("button", name="Download Model from HuggingFace").click()
    page.get_by_label("HuggingFace Model Repository").fill("tiny/qwen2")
    page.locator("#estimate .estimate-row").first.wait_for()
    page.locator(".model-card[data-status=downloading] .progress-fill").first.wait_for()
    page.wait_for_timeout(2500)
    shot(page, "models-downloading")
    hub.set_rate(None)
    page.locator(".model-card[data-status=ready]").nth(1).wait_for(timeout=300_000)

    card = page.locator(f"#model-{ready.pk}")
    card.get_by_role("button", name="Extract Activations").click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_label("Max Samples").fill("200")
    dialog.get_by_label("Batch Size").fill("2")
    dialog.get_by_label("Context Size").fill("128")
    dialog.locator("#extract-start").click()
    dialog.get_by_text("Extracting…").wait_for()
    shot(page, "extract-running")
    wait_for(
        lambda: ExtractionJob.objects.filter(status="completed").exists(), timeout=600, every=0.2
    )
    dialog.locator(".extraction-notice").wait_for()
    dialog.get_by_text("Load it in Python").click()
    dialog.locator(".extraction-snippet").scroll_into_view_if_needed()
    shot(page, "extract-completed")
    dialog.get_by_label("Close").click()

    page.set_viewport_size({"width": 390, "height": 844})
    page.goto("/models/")
    page.get_by_text("API Connected").wait_for()
    shot(page, "models-390px", full_page=True)
