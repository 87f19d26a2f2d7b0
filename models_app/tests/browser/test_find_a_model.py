"""Find a model in the browser: search the Hub, one click fills the form, the estimate counts a
mixture-of-experts model's experts, the download really quantizes them; a repo that needs custom
code is refused with our message before anything downloads."""

from __future__ import annotations

import pytest

from models_app.models import Model

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def test_search_fill_estimate_and_download_a_mixture_of_experts_model(page, live, hub, shapes):
    page.goto("/models/")
    page.get_by_text("API Connected").wait_for()
    page.get_by_label("Search the Hugging Face Hub").fill("mixtral")
    result = page.locator(".hub-result[data-repo='shapes/mixtral']")
    result.wait_for()
    result.get_by_role("button", name="shapes/mixtral").click()
    repo_input = page.get_by_label("HuggingFace Model Repository")
    assert repo_input.input_value() == "shapes/mixtral"
    experts = page.locator("#estimate [data-stat=experts]")
    experts.wait_for()
    assert experts.inner_text() == "8 experts, 2 active per token"
    page.get_by_label("Quantization Format").select_option("Q4")
    page.get_by_role("button", name="Download Model from HuggingFace").click()
    # a download, a Q4 load and every expert quantized by the worker: minutes on a busy machine
    # (CI runs both databases' suites side by side on 2 cores; 120 s ran out twice there)
    page.locator(".model-card .status-pill", has_text="Ready").wait_for(timeout=600_000)
    row = Model.objects.get()
    assert row.metadata["load"]["quantized_experts"] == 2 * row.num_layers  # gate_up + down
    card = page.locator(f"#model-{row.pk}")
    assert "Q4 quantization" in card.inner_text()


def test_a_repo_that_needs_custom_code_is_refused_in_the_form(page, page_watch, live, hub, shapes):
    page_watch.expect_refusal("/models/estimate", 422)  # the refusals this test provokes
    page_watch.expect_refusal("/models/download", 422)
    page.goto("/models/")
    page.get_by_label("HuggingFace Model Repository").fill("shapes/custom-code")
    page.locator("#estimate", has_text="trust_remote_code").wait_for()
    page.get_by_role("button", name="Download Model from HuggingFace").click()
    page.locator("#download-error", has_text="never enables").wait_for()
    assert not Model.objects.exists()
    # said once: the refusal under the button replaces the same words in the estimate box
    assert page.locator("#estimate .form-error").count() == 0
    assert page.get_by_text("never enables").count() == 1
