"""At a phone's width (390 px) nothing is wider than the screen: the header, the download form,
the model cards (with a completed extraction's notice and its long path), the extraction modal
and the Datasets page all fit, so nothing scrolls sideways."""

from __future__ import annotations

import pytest

from models_app.tests.helpers import download, extract, text_dataset

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

WIDTH = 390

OVERFLOW = """() => {
  const width = document.documentElement.clientWidth;
  const wide = [...document.querySelectorAll("body *")].filter((el) => {
    const box = el.getBoundingClientRect();
    return box.width > 0 && (box.right > width + 0.5 || box.left < -0.5)
      && !el.closest(".overflow-x-auto, .overflow-hidden, .truncate, .sr-only");
  });
  return {
    scroll: document.documentElement.scrollWidth,
    wide: wide.slice(0, 5).map((el) => el.tagName + "." + [...el.classList].slice(0, 4).join(".")),
  };
}"""


def fits(page) -> None:
    found = page.evaluate(OVERFLOW)
    assert found["scroll"] <= WIDTH and found["wide"] == [], found


def test_the_pages_fit_a_390_px_screen(page, live, hub):
    model = download("tiny/gpt2", "FP16")
    dataset = text_dataset()
    job = extract(model, dataset)
    assert job.status == "completed", job.error_message
    page.set_viewport_size({"width": WIDTH, "height": 844})

    page.goto("/models/")
    page.get_by_text("API Connected").wait_for()
    card = page.locator(f"#model-{model.pk}")
    card.locator(".extraction-notice").wait_for()
    page.get_by_label("HuggingFace Model Repository").fill("tiny/llama-big")
    page.locator("#estimate .estimate-row").first.wait_for()  # the four estimate tiles
    fits(page)

    card.get_by_role("button", name="Extract Activations").click()
    page.locator("#extract-form").wait_for()
    fits(page)
    page.get_by_role("dialog").get_by_label("Close").click()

    page.goto("/datasets/")
    page.locator(f"#dataset-{dataset.pk}").wait_for()
    fits(page)
