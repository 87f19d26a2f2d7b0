"""Extract activations from the browser: modal → start → live progress → history with stats."""

from __future__ import annotations

import contextlib
import io

import pytest

from models_app.models import ExtractionJob
from models_app.tests.helpers import download, text_dataset, wait_for

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def run_snippet(code: str, job: ExtractionJob) -> None:
    """Run the notice's "load it in Python" snippet as a user would paste it: it must read every
    hook of the extraction, with the shapes the manifest gives."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "snippet", "exec"), {})  # noqa: S102 - the page's own snippet
    lines = out.getvalue().splitlines()
    hooks = job.manifest["hooks"]
    assert len(lines) == len(hooks) == 9
    for line, hook in zip(lines, hooks, strict=True):
        n_seq = hook["shards"][0]["n_seq"]
        assert line == f"{hook['name']} torch.Size([{n_seq}, {job.context_size}, {hook['d']}])"


def test_extract_three_layers_three_hooks_from_the_modal(page, live, hub):
    model = download("tiny/llama-big", "FP16")
    text_dataset(lines=["a long line of words for the tiny model " * 20] * 300)
    page.goto("/models/")
    page.get_by_text("API Connected").wait_for()
    page.locator(f"#model-{model.pk}").get_by_role("button", name="Extract Activations").click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_text("Select Layers").wait_for()
    assert dialog.locator("input[name=layers]").count() == 4
    dialog.get_by_role("button", name="Deselect All").click()
    assert dialog.locator("#extract-start").is_disabled()
    for label in ("L0", "L2", "L3", "MLP Output", "Attention Output"):
        dialog.get_by_text(label, exact=True).click()
    dialog.get_by_label("Max Samples").fill("120")
    dialog.get_by_label("Batch Size").fill("2")
    dialog.get_by_label("Context Size").fill("128")
    dialog.locator("#extract-start").click()
    # The modal stays open on its "Extracting…" box; the card shows the progress too.
    box = dialog.locator(".extraction-box")
    box.get_by_text("Extracting…").wait_for()
    assert dialog.locator("#extract-start").inner_text() == "Extracting..."
    card = page.locator(f"#model-{model.pk}")
    card.locator(".extraction-progress").wait_for()  # live on the card, pushed over the socket
    # however long the job takes on this machine: wait for its row, then for the page to show it
    job = wait_for(
        lambda: ExtractionJob.objects.exclude(status__in=["queued", "running"]).first(),
        timeout=600,
        every=0.2,
    )
    assert job.status == "completed", job.error_message
    notice = dialog.locator(".extraction-box[data-status=completed] .extraction-notice")
    notice.wait_for()  # the completion notice, pushed into the open modal
    assert notice.locator(".extraction-path").inner_text() == job.output_path
    notice.get_by_role("button", name="Copy path").click()
    notice.get_by_role("button", name="Copied").or_(notice.get_by_text("Selected")).wait_for()
    assert dialog.locator("#extract-start").inner_text() == "Start Extraction"
    notice.get_by_text("Load it in Python").click()
    run_snippet(notice.locator(".extraction-snippet").inner_text(), job)
    dialog.get_by_label("Close").click()
    card.locator(".extraction-notice .extraction-path", has_text=job.output_path).wait_for()
    card.get_by_role("link", name="Extractions (1)").click()
    page.locator(".extraction[data-status=completed]").wait_for()
    assert job.layers == [0, 2, 3] and job.hook_types == ["attention", "mlp", "residual"]
    assert page.locator(".site-stats").count() == 9
    assert page.locator(".site-stats svg.histogram").count() == 9


def test_a_gemma2_shaped_model_extracts_residual_mlp_attention_and_z(page, live, hub, shapes):
    """As a new user would: the post-norm Gemma-2 layout, every branch site, checked in the modal
    and then against plain transformers with cloning hooks."""
    from models_app.tests.test_extraction_sites import _check_job

    model = download("shapes/gemma2", "FP16")
    text_dataset(lines=["a long line of words for the tiny model " * 20] * 50)
    page.goto("/models/")
    page.get_by_text("API Connected").wait_for()
    page.locator(f"#model-{model.pk}").get_by_role("button", name="Extract Activations").click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_text("Select Layers").wait_for()
    for label in ("MLP Output", "Attention Output", "Attention Heads (z)"):
        dialog.get_by_text(label, exact=True).click()
    dialog.get_by_label("Max Samples").fill("8")
    dialog.get_by_label("Batch Size").fill("4")
    dialog.get_by_label("Context Size").fill("16")
    dialog.get_by_role("button", name="Check sites & shapes").click()
    sites = dialog.get_by_test_id("sites")
    sites.get_by_text("blocks.1.attn.hook_z").wait_for()
    assert "model.layers.1.post_feedforward_layernorm" in sites.inner_text()
    assert "[4, 64]" in sites.inner_text()  # 4 heads of 64: wider than the 128-wide stream
    dialog.locator("#extract-start").click()
    dialog.locator(".extraction-box").wait_for()  # the modal stays open on its Extracting… box
    dialog.get_by_label("Close").click()
    page.get_by_role("dialog").wait_for(state="detached")
    job = wait_for(
        lambda: ExtractionJob.objects.exclude(status__in=["queued", "running"]).first(),
        timeout=600,
        every=0.2,
    )
    assert job.hook_types == ["attention", "mlp", "residual", "z"] and job.layers == [0, 1]
    _check_job(job, "shapes/gemma2")
    page.locator(f"#model-{model.pk}").get_by_role("link", name="Extractions (1)").click()
    page.locator(".extraction[data-status=completed]").wait_for()
    assert page.locator(".site-stats").count() == 8
