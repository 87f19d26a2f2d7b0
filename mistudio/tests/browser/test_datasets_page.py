"""The Datasets page in a real browser: an upload refused for its name says so once, and picking
another file drops the refused name and its message, so the next upload is not refused again;
the new card arrives without an error even when the websocket pushes it first, queued, and the
live worker takes it to ready (or error, naming the bad line) on the page, without a reload."""

from __future__ import annotations

import pytest

from datasets_app.models import Dataset
from models_app.tests.helpers import text_dataset

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def test_a_refused_name_does_not_stick_to_the_next_upload(page, page_watch, live, tmp_path):
    page_watch.expect_refusal("/datasets/upload", 409)  # the taken name below
    text_dataset(name="corpus")
    first, second = tmp_path / "first.txt", tmp_path / "stories.txt"
    first.write_text("one line of text\nanother line of text\n")
    second.write_text("a second file\nwith two lines\n")
    page.goto("/datasets/")
    page.get_by_text("API Connected").wait_for()

    page.locator("#upload-file").set_input_files(str(first))
    page.get_by_label("Name").first.fill("corpus")
    page.get_by_role("button", name="Upload Dataset").click()
    page.locator("#upload-error", has_text="already exists").wait_for()
    assert Dataset.objects.count() == 1

    page.locator("#upload-file").set_input_files(str(second))  # the user picks another file
    assert page.locator("#upload-name").input_value() == ""
    assert page.locator("#upload-error").inner_text() == ""
    page.get_by_role("button", name="Upload Dataset").click()
    card = page.locator(".dataset-card", has_text="stories")
    card.wait_for()
    assert sorted(Dataset.objects.values_list("name", flat=True)) == ["corpus", "stories"]
    assert page.locator("#upload-error").inner_text() == ""
    assert page.locator(".dataset-card").count() == 2
    # the request only queued it: the live worker normalizes it and the websocket brings the
    # ready card, rows and preview, without a reload
    page.locator('.dataset-card[data-status="ready"]', has_text="stories").wait_for()
    assert "2 rows" in card.inner_text() and "a second file" in card.text_content()
    assert Dataset.objects.get(name="stories").status == "ready"


def test_an_upload_bad_past_its_first_rows_ends_error_on_its_card(page, page_watch, live, tmp_path):
    """The request checks the first rows only; the worker finds line 201 and the card says so."""
    bad = tmp_path / "late.jsonl"
    bad.write_text('{"text": "fine"}\n' * 200 + "{broken\n")
    page.goto("/datasets/")
    page.get_by_text("API Connected").wait_for()
    page.locator("#upload-file").set_input_files(str(bad))
    page.get_by_role("button", name="Upload Dataset").click()
    card = page.locator('.dataset-card[data-status="error"]', has_text="late")
    card.wait_for()
    assert "Line 201" in card.inner_text()
    assert Dataset.objects.get().status == "error"
