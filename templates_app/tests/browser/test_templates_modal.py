"""The templates section of the extraction modal, in a real browser against a live stack:
save the current configuration, star it, load it back into the form, export, import, delete."""

from __future__ import annotations

import re

import pytest

from models_app.tests.helpers import download
from templates_app.models import ExtractionTemplate

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def open_modal(page, model) -> None:
    page.goto("/models/")
    page.locator(f"#model-{model.pk}").get_by_role("button", name="Extract Activations").click()
    page.locator("#extract-form").wait_for()


def layer(page, i: int):
    return page.locator(f"#extract-form input[name=layers][value='{i}']")


def test_save_star_load_export_import_and_delete_a_template(page, page_watch, live, hub, tmp_path):
    page_watch.expect_refusal("/templates/save", 409)  # the duplicate name below
    page_watch.expect_refusal("/templates/import", 400)  # the file that is not JSON below
    model = download("tiny/gpt2")  # a ready 2-layer GPT-2 from the fake hub
    open_modal(page, model)
    section = page.locator("#templates-section")
    section.get_by_text("Extraction Templates (0)").click()
    name = page.get_by_label("Template name")
    name.wait_for()
    # The auto-generated name follows the form: pick only layer 1 and MLP + residual.
    for box in page.locator("#extract-form input[name=layers]").all():
        box.evaluate("b => { b.checked = false; }")
    layer(page, 1).evaluate("b => b.click()")
    page.locator("#extract-form input[name=hook_types][value=mlp]").evaluate("b => b.click()")
    assert re.fullmatch(r"residual_mlp_layer1_1000samples_\d{4}", name.input_value())
    page.get_by_label("Template description").fill("late MLP")
    page.get_by_role("button", name="Save Current Config").click()
    section.get_by_text("Extraction Templates (1)").wait_for()
    row = ExtractionTemplate.objects.get()
    assert (row.layers, row.hook_types, row.description) == ([1], ["residual", "mlp"], "late MLP")
    assert page.locator(".template-meta").inner_text() == "1 layer • residual, mlp • 1000 samples"
    page.locator(".templates-notice", has_text="Saved template").wait_for()
    name.fill(row.name)  # the same name again: refused, and the old "Saved" notice goes
    page.get_by_role("button", name="Save Current Config").click()
    page.locator("#templates-error", has_text="already").wait_for()
    assert page.locator(".templates-notice").count() == 0

    page.get_by_role("button", name=f"Star {row.name}").click()
    page.locator(f"#template-{row.pk}[data-favorite=true]").wait_for()
    assert ExtractionTemplate.objects.get().is_favorite
    assert page.locator(f"#template-{row.pk} svg.fill-yellow-400").count() == 1

    layer(page, 1).evaluate("b => b.click()")  # change the form, then load the template back
    layer(page, 0).evaluate("b => b.click()")
    assert not layer(page, 1).is_checked()
    page.get_by_role("link", name=f"Load {row.name}").click()
    page.locator(f"#template-{row.pk}.ring-emerald-500").wait_for()  # the modal came back
    assert layer(page, 1).is_checked() and not layer(page, 0).is_checked()
    assert page.locator("#extract-form input[name=hook_types][value=mlp]").is_checked()
    assert page.locator("#templates-section").get_attribute("open") is not None

    with page.expect_download() as info:
        page.get_by_role("link", name="Export All").click()
    download_ = info.value
    assert re.fullmatch(r"miStudio-templates-\d{4}-\d{2}-\d{2}\.json", download_.suggested_filename)
    exported = tmp_path / download_.suggested_filename
    download_.save_as(exported)
    page.locator("#templates-import-file").set_input_files(str(exported))
    summary = page.locator("#templates-import-summary")
    summary.wait_for()
    assert "0 imported · 1 skipped · 0 errors" in " ".join(summary.inner_text().split())
    page.get_by_label("Already here on import:").select_option("rename")
    page.locator("#templates-import-file").set_input_files(str(exported))
    page.get_by_text("Extraction Templates (2)").wait_for()  # imported as a copy
    assert "1 imported · 0 skipped" in " ".join(summary.inner_text().split())
    copy = ExtractionTemplate.objects.exclude(pk=row.pk).get()
    assert copy.name == f"{row.name} (2)" and copy.layers == row.layers
    bad = tmp_path / "not-json.json"
    bad.write_text("this is not JSON")
    page.locator("#templates-import-file").set_input_files(str(bad))
    page.locator("#templates-error", has_text="not valid JSON").wait_for()
    assert summary.count() == 0  # the previous import's summary does not linger under the error
    page.once("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name=f"Delete {copy.name}").click()
    page.get_by_text("Extraction Templates (1)").wait_for()

    page.once("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name=f"Delete {row.name}").click()
    page.get_by_text("No templates saved yet").wait_for()
    assert ExtractionTemplate.objects.count() == 0
    assert section.get_by_text("Extraction Templates (0)").is_visible()
