"""A researcher's first download, in a real browser against the fake hub."""

from __future__ import annotations

import re

import pytest

from models_app.models import Model

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def download_width(page) -> float | None:
    """The download bar's width, read in one step with the card's status: a card swapped to
    `quantizing` between two reads would show the quantization bar (0%) as the download's."""
    style = page.evaluate(
        """() => {
          const card = document.querySelector(".model-card");
          if (!card || card.dataset.status !== "downloading") return null;
          const fill = card.querySelector(".progress-fill");
          return fill ? fill.getAttribute("style") || "" : null;
        }"""
    )
    match = re.search(r"width:\s*([\d.]+)%", style or "")
    return float(match.group(1)) if match else None


def test_download_progress_ready_and_architecture(page, live, hub):
    hub.set_rate(6_000_000)  # ~22 MB: a few seconds of visible progress
    page.goto("/models/")
    page.get_by_text("API Connected").wait_for()
    button = page.get_by_role("button", name="Download Model from HuggingFace")
    assert button.is_disabled()
    page.get_by_label("HuggingFace Model Repository").fill("tiny/llama-big")
    page.locator("#estimate .estimate-row").first.wait_for()  # the fit badges before download
    page.get_by_label("Quantization Format").select_option("Q4")
    button.click()
    page.locator(".model-card").first.wait_for()  # maybe pushed before the answer: wait for it
    page.wait_for_function("() => document.getElementById('model-repo').value === ''")

    seen: list[float] = []
    page.locator(".model-card[data-status=downloading] .progress-fill").first.wait_for()
    while (width := download_width(page)) is not None:
        seen.append(width)
        page.wait_for_timeout(100)
    assert len(set(seen)) >= 3 and seen == sorted(seen), seen  # moving, never backwards

    page.locator(".model-card .status-pill", has_text="Ready").wait_for(timeout=90_000)
    row = Model.objects.get()
    assert row.status == "ready" and row.quantization == "Q4"

    page.locator(f"#model-{row.pk} a[title='View architecture']").click()
    dialog = page.get_by_role("dialog")
    dialog.wait_for()
    assert dialog.locator("[data-stat=total_layers]").inner_text() == "4"
    assert dialog.locator("[data-stat=hidden_dimension]").inner_text() == "512"
    assert "TransformerBlock_3" in dialog.inner_text()
    dialog.get_by_label("Close").click()
    assert page.get_by_role("dialog").count() == 0
