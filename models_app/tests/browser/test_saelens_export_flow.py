"""SAELens in the browser: the modal's output size line (Start disabled when it will not fit) and
the Export for SAELens button, whose progress and path arrive without a reload."""

from __future__ import annotations

from pathlib import Path

import datasets
import pytest

from datasets_app.models import Dataset
from models_app.models import ExtractionExport
from models_app.tests.helpers import download, extract, text_dataset

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def test_the_modal_shows_the_output_size_and_disables_start_when_it_cannot_fit(page, live, hub):
    model = download("tiny/gpt2", "FP16")
    # the estimate is bounded by the dataset's size: this one's row says it is as large as a
    # web crawl (nothing reads its texts here), so 1e8 samples truly do not fit
    Dataset.objects.filter(pk=text_dataset().pk).update(size_bytes=10**15, row_count=10**9)
    page.goto("/models/")
    page.get_by_text("API Connected").wait_for()
    page.locator(f"#model-{model.pk}").get_by_role("button", name="Extract Activations").click()
    dialog = page.get_by_role("dialog")
    estimate = dialog.locator("#extract-estimate [data-fits=true]")
    estimate.wait_for()
    assert "Output:" in estimate.inner_text() and "free" in estimate.inner_text()
    start = dialog.locator("#extract-start")
    assert start.is_enabled()
    before = int(estimate.get_attribute("data-output-bytes"))
    dialog.get_by_label("Output", exact=True).select_option("safetensors+saelens")
    page.wait_for_function(
        f"Number(document.querySelector('#extract-estimate [data-fits]')"
        f"?.dataset.outputBytes) > {before}"
    )
    dialog.get_by_label("Max Samples").fill("100000000")  # terabytes: no disk here holds them
    dialog.locator("#extract-estimate [data-fits=false]").wait_for()
    assert "will not fit" in dialog.locator("#extract-estimate").inner_text()
    assert start.is_disabled()
    dialog.get_by_label("Max Samples").fill("10")
    dialog.locator("#extract-estimate [data-fits=true]").wait_for()
    assert start.is_enabled()


def test_export_for_saelens_shows_the_path_without_a_reload(page, live, hub):
    model = download("tiny/gpt2", "FP16")
    job = extract(model, text_dataset(), layers=[1], hook_types=["residual"], max_samples=12,
                  context_size=16)  # fmt: skip
    assert job.status == "completed", job.error_message
    page.goto(f"/models/{model.pk}/extractions")
    page.get_by_text("API Connected").wait_for()
    page.evaluate("window.__same_page = true")
    row = page.locator(f"#extraction-{job.pk}")
    row.get_by_role("button", name="Export for SAELens").click()
    path = row.locator(".export-path")
    path.wait_for()  # the download cluster's task, pushed over the websocket
    folder = Path(job.output_path) / "saelens"
    assert path.inner_text() == str(folder)
    assert page.evaluate("window.__same_page") is True  # no reload
    assert ExtractionExport.objects.get(pk=job.pk).status == "completed"
    assert len(datasets.load_from_disk(str(folder))) == 12
    # the models page's card shows it too
    page.goto("/models/")
    card = page.locator(f"#model-{model.pk}")
    card.locator(".export-path").wait_for()
