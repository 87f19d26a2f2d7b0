"""Choose what special-token strings in the data become, from the modal, as a new user would."""

from __future__ import annotations

import pytest

from models_app.models import ExtractionJob
from models_app.tests.helpers import download, text_dataset, wait_for

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]
CHAT = "<|bos|>User: where does the train go<|endoftext|>Assistant: to the city<|endoftext|>"


def test_parse_special_tokens_chosen_in_the_modal(page, live, hub):
    model = download("tiny/llama", "FP16")
    text_dataset("chat", [CHAT] * 50)
    page.goto("/models/")
    page.get_by_text("API Connected").wait_for()
    page.locator(f"#model-{model.pk}").get_by_role("button", name="Extract Activations").click()
    dialog = page.get_by_role("dialog")
    policy = dialog.get_by_label("Special-token strings in the text")
    assert policy.input_value() == "text"  # the default: strings are plain text
    policy.select_option("parse")
    dialog.get_by_label("Max Samples").fill("8")
    dialog.get_by_label("Context Size").fill("32")
    dialog.locator("#extract-start").click()
    dialog.locator(".extraction-box").wait_for()  # the modal stays open on its Extracting… box
    dialog.get_by_label("Close").click()
    page.get_by_role("dialog").wait_for(state="detached")
    card = page.locator(f"#model-{model.pk}")
    card.get_by_role("link", name="Extractions (1)").click()
    job = wait_for(
        lambda: ExtractionJob.objects.exclude(status__in=["queued", "running"]).first(),
        timeout=600,
        every=0.2,
    )
    assert job.status == "completed", job.error_message
    assert job.special_tokens == "parse" and job.manifest["special_tokens"] == "parse"
    page.locator(".extraction[data-status=completed]").wait_for()
    assert "special tokens parsed" in page.locator(".extraction").first.inner_text()
