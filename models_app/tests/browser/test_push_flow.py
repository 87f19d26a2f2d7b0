"""Push to Hub from the browser: the inline form on a completed extraction, a refusal under it,
then the push's state moving live (websocket) to the repo's link, without a reload."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from mistudio.testing.fakehub import VALID_TOKEN
from models_app.models import PushJob
from models_app.share import push_files
from models_app.tests.helpers import download, extract, text_dataset

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def test_push_an_extraction_from_its_row(page, page_watch, live, hub):
    model = download("tiny/gpt2", "FP16")
    job = extract(model, text_dataset(), layers=[0], hook_types=["residual"])
    assert job.status == "completed", job.error_message
    page.goto(f"/models/{model.pk}/extractions")
    page.get_by_text("API Connected").wait_for()
    row = page.locator(f"#extraction-{job.pk}")
    row.get_by_text("Push to Hub").click()
    form = row.locator("form.push-form")
    form.get_by_label("Dataset repository").fill("no-owner")
    form.get_by_label("Access token (write)").fill(VALID_TOKEN)
    page_watch.expect_refusal(f"/models/extractions/{job.pk}/push", 422)
    form.get_by_role("button", name="Push").click()
    row.locator(f"#push-error-{job.pk}").get_by_text("Give the owner too").wait_for()
    assert PushJob.objects.count() == 0
    form.get_by_label("Dataset repository").fill("tester/from-the-page")
    form.get_by_role("button", name="Push").click()
    # the download cluster runs it; the row follows over the websocket, however long it takes
    done = row.locator(f"#push-status-{job.pk}[data-status=completed]")
    done.wait_for(timeout=300_000)
    link = done.locator("a.push-url")
    assert link.inner_text() == "tester/from-the-page"
    assert link.get_attribute("href") == f"{hub.endpoint}/datasets/tester/from-the-page"
    assert "(private)" in done.inner_text()
    assert row.locator(f"#push-error-{job.pk}").inner_text() == ""
    assert form.get_by_label("Access token (write)").input_value() == ""
    assert VALID_TOKEN not in page.content()
    repo = hub.dataset_repos["tester/from-the-page"]
    pushed = repo.commits[repo.main]
    for name, local, _ in push_files(job.output_path, job.manifest):
        assert pushed[name].sha256 == hashlib.sha256(Path(local).read_bytes()).hexdigest()
    assert "README.md" in pushed and PushJob.objects.get().commit_sha == repo.main
