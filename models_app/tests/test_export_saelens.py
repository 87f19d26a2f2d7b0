"""SAELens export and output-size fixes: a removed export folder may be exported again, the CLI
export's disk check (before its bar), the estimate bounded by the dataset's size, a clear 422 for
a max_samples that is not a whole number, and the SAELens phase's progress going on, not back."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command
from safetensors.torch import load_file

from models_app import extraction, tasks
from models_app.consumers import card_html
from models_app.models import ExtractionExport, ExtractionJob

from .helpers import download, extract, text_dataset

pytestmark = pytest.mark.django_db(transaction=True)
HX = {"HTTP_HX_REQUEST": "true"}
SAE = "safetensors+saelens"
WHOLE = "must be a whole number between 1 and 100000000"


@pytest.fixture
def ready(hub):
    return download("tiny/gpt2", "FP16"), text_dataset()


def post(client, url, data):
    return client.post(url, json.dumps(data), content_type="application/json")


def tensor_bytes(job: ExtractionJob) -> int:
    return sum(
        t.numel() * t.element_size()
        for h in job.manifest["hooks"]
        for s in h["shards"]
        for t in load_file(Path(job.output_path) / s["file"]).values()
    )


def test_a_removed_export_folder_shows_missing_and_may_be_exported_again(client, ready):
    model, ds = ready
    job = extract(model, ds, layers=[0], hook_types=["mlp"], max_samples=8, context_size=16,
                  output_format=SAE)  # fmt: skip
    folder = Path(job.output_path) / "saelens"
    assert job.status == "completed" and folder.is_dir(), job.error_message
    export = client.get(f"/api/extractions/{job.pk}").json()["export"]
    assert export["status"] == "completed" and export["missing"] is False
    assert post(client, f"/api/extractions/{job.pk}/export", {}).status_code == 409
    shutil.rmtree(folder)  # the user's `rm -rf <out>/saelens`
    export = client.get(f"/api/extractions/{job.pk}").json()["export"]
    assert export["missing"] is True
    assert 'data-export="missing"' in card_html(model.pk) and "folder missing" in card_html(
        model.pk
    )
    r = post(client, f"/api/extractions/{job.pk}/export", {})
    assert r.status_code == 202 and r.json()["status"] == "queued", r.content
    tasks.extraction_export_task(job.pk)
    export = client.get(f"/api/extractions/{job.pk}").json()["export"]
    assert export["status"] == "completed" and export["missing"] is False, export
    assert 'data-export="completed"' in card_html(model.pk)
    # an incomplete folder (a data file gone) is not an export either
    next(folder.glob("data-*.arrow")).unlink()
    assert ExtractionExport.objects.get(pk=job.pk).missing
    assert post(client, f"/api/extractions/{job.pk}/export", {}).status_code == 202


def test_the_cli_export_refuses_before_its_bar(ready, tmp_path, settings, capsys):
    model, ds = ready
    job = extract(model, ds, layers=[0], hook_types=["mlp"], max_samples=8, context_size=16)
    site = job.manifest["hooks"][0]["name"]
    out = tmp_path / "exports" / "sae"
    refusals = [
        ((str(out), "--sites", "blocks.9.nope"), "No site blocks.9.nope"),
        ((str(tmp_path),), "already exists"),
    ]
    for args, message in refusals:
        with pytest.raises(CommandError, match=message):
            call_command("export_activations", job.pk, *args)
        assert f"export {job.pk}" not in capsys.readouterr().err  # no bar drawn
    settings.DISK_MARGIN_BYTES = shutil.disk_usage(tmp_path).free  # MISTUDIO_DISK_MARGIN_MB huge
    with pytest.raises(CommandError, match="Not enough disk space.*the SAELens export"):
        call_command("export_activations", job.pk, str(out), "--sites", site)
    assert f"export {job.pk}" not in capsys.readouterr().err and not out.exists()
    settings.DISK_MARGIN_BYTES = 0
    call_command("export_activations", job.pk, str(out), "--sites", site)
    captured = capsys.readouterr()
    assert str(out) in captured.out and f"export {job.pk}" in captured.err
    assert (out / "state.json").is_file()


def test_the_estimate_is_bounded_by_a_small_dataset(client, ready):
    model, _ = ready
    tiny = text_dataset("tiny", [f"row {i}: a few words of text here." for i in range(45)])
    assert tiny.row_count == 45 and tiny.size_bytes < 4096
    body = {"layers": [0], "hook_types": ["residual"], "max_samples": 100_000_000,
            "context_size": 16, "output_format": SAE}  # fmt: skip
    blind = post(client, f"/api/models/{model.pk}/extract-estimate", body).json()
    assert blind["n_sequences"] == 100_000_000 and blind["upper_bound"] is True
    est = post(client, f"/api/models/{model.pk}/extract-estimate",
               {**body, "dataset_id": tiny.pk}).json()  # fmt: skip
    assert est["fits"] and est["n_sequences"] < 500, est
    form = {**body, "layers": ["0"], "dataset_id": tiny.pk}
    page = client.post(f"/models/{model.pk}/extract/estimate", form, **HX).content.decode()
    assert 'data-fits="true"' in page and "upper bound" in page
    # the start is not refused for terabytes it would never write, and writes at most the estimate
    r = post(client, f"/api/models/{model.pk}/extract-activations", {**body, "dataset_id": tiny.pk})
    assert r.status_code == 202, r.content
    tasks.extraction_run_task(r.json()["extraction_id"])
    job = ExtractionJob.objects.get()
    assert job.status == "completed", job.error_message
    written = tensor_bytes(job)
    assert 0 < written <= est["shard_bytes"] <= 4 * written
    assert job.saelens_export.bytes_written <= est["saelens_bytes"] + 64 * 1024


@pytest.mark.parametrize("bad", [1e30, 2.5, "abc", True, 10**9, 0, "1e30"])
def test_max_samples_that_is_not_a_whole_number_is_a_clear_422(client, ready, bad):
    model, ds = ready
    body = {"layers": [0], "hook_types": ["residual"], "max_samples": bad}
    for url in (f"/api/models/{model.pk}/extract-estimate",
                f"/api/models/{model.pk}/extract-activations"):  # fmt: skip
        r = post(client, url, {**body, "dataset_id": ds.pk})
        assert r.status_code == 422 and WHOLE in json.dumps(r.json()), r.content
        assert "Unable to parse" not in json.dumps(r.json())
    page = client.post(f"/models/{model.pk}/extract/estimate",
                       {"layers": ["0"], "hook_types": ["residual"], "max_samples": str(bad)},
                       **HX).content.decode()  # fmt: skip
    assert WHOLE in page
    assert not ExtractionJob.objects.exists()


def test_the_saelens_phase_goes_on_from_the_extraction_progress(ready):
    model, ds = ready
    job = extract(model, ds, layers=[0, 1], hook_types=["residual"], max_samples=40,
                  context_size=16)  # fmt: skip
    ExtractionJob.objects.filter(pk=job.pk).update(progress=80.0)  # a short dataset's end
    seen = []

    def should_cancel() -> bool:  # called before each progress write: records the last one
        row = ExtractionJob.objects.values("progress", "phase").get(pk=job.pk)
        seen.append((row["progress"], row["phase"]))
        return False

    extraction.extraction_saelens_phase(job, should_cancel)
    row = ExtractionJob.objects.get(pk=job.pk)
    assert seen and all(p >= 80.0 for p, _ in seen), seen
    assert not any("0/1 sequences" in phase for _, phase in seen), seen
    assert row.progress == 100.0 and row.phase.startswith("writing the SAELens folder: 40/40")
    assert extraction.phase_progress(80.0, 1, 2) == 90.0
