"""SAELens output (issue 15): the output_format choice (API, modal, CLI), the Export for SAELens
task (API and button), and the output size with the free disk before Start.

The SAELens folder is judged by `datasets` itself (load_from_disk) and by SAELens training from
it; its values are compared with the shards read with safetensors."""

from __future__ import annotations

import json
import shutil
from datetime import timedelta
from pathlib import Path

import datasets
import pytest
import torch
from django.core.management import CommandError, call_command
from django.utils import timezone
from safetensors.torch import load_file

from models_app import reconcile, tasks
from models_app.consumers import card_html
from models_app.models import ExtractionExport, ExtractionJob
from models_app.selectors import device
from templates_app.models import ExtractionTemplate

from .helpers import download, extract, text_dataset
from .saelens import saelens_train

pytestmark = pytest.mark.django_db(transaction=True)
HX = {"HTTP_HX_REQUEST": "true"}
SAE = "safetensors+saelens"
BODY = {"layers": [0, 1], "hook_types": ["residual", "mlp"], "batch_size": 4,
        "max_samples": 40, "context_size": 32}  # fmt: skip


@pytest.fixture
def ready(hub):
    return download("tiny/gpt2", "FP16"), text_dataset()


def post(client, url, data):
    return client.post(url, json.dumps(data), content_type="application/json")


def shards(job: ExtractionJob, site: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A site's activations and token ids, read straight from its shards."""
    hook = next(h for h in job.manifest["hooks"] if h["name"] == site)
    parts = [load_file(Path(job.output_path) / s["file"]) for s in hook["shards"]]
    return torch.cat([p["activations"] for p in parts]), torch.cat([p["token_ids"] for p in parts])


def assert_saelens_folder(job: ExtractionJob, folder: Path) -> None:
    """`datasets` opens it: one column per hook plus token_ids, equal to the shards."""
    ds = datasets.load_from_disk(str(folder))
    names = [h["name"] for h in job.manifest["hooks"]]
    assert sorted(ds.column_names) == sorted([*names, "token_ids"])
    ds.set_format("torch")
    for name in names:
        acts, ids = shards(job, name)
        assert len(ds) == acts.shape[0] and torch.equal(ds[:][name], acts.float())
        assert torch.equal(ds[:]["token_ids"], ids)


def test_the_saelens_choice_writes_a_folder_saelens_trains_from(client, ready, tmp_path):
    model, ds = ready
    r = post(client, f"/api/models/{model.pk}/extract-activations",
             {**BODY, "dataset_id": ds.pk, "output_format": SAE})  # fmt: skip
    assert r.status_code == 202, r.content
    pk = r.json()["extraction_id"]
    tasks.extraction_run_task(pk)
    body = client.get(f"/api/extractions/{pk}").json()
    assert body["status"] == "completed" and body["output_format"] == SAE, body["error_message"]
    folder = Path(body["output_path"]) / "saelens"
    assert body["export"]["status"] == "completed" and body["export"]["path"] == str(folder)
    assert body["export"]["bytes_written"] > 0
    job = ExtractionJob.objects.get(pk=pk)
    assert_saelens_folder(job, folder)
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".export-")]
    pytest.importorskip("sae_lens")
    saelens_train(folder, "blocks.1.hook_resid_post", d_in=job.manifest["hooks"][0]["d"],
                  context_size=32, work=tmp_path)  # fmt: skip
    # already exported: a second export is refused with the path
    r = post(client, f"/api/extractions/{pk}/export", {"format": "saelens"})
    assert r.status_code == 409 and str(folder) in r.json()["detail"]
    assert client.delete(f"/api/extractions/{pk}").status_code == 204
    assert not folder.parent.exists()


def test_a_bad_output_format_is_refused_everywhere_and_creates_nothing(client, ready):
    model, ds = ready
    r = post(client, f"/api/models/{model.pk}/extract-activations",
             {**BODY, "dataset_id": ds.pk, "output_format": "hdf5"})  # fmt: skip
    assert r.status_code == 422 and "safetensors+saelens" in json.dumps(r.json())
    form = {"dataset_id": ds.pk, "layers": ["0"], "hook_types": ["mlp"], "output_format": "hdf5"}
    r = client.post(f"/models/{model.pk}/extract/start", form, **HX)
    assert r.status_code == 422 and "Output format" in r.content.decode()
    with pytest.raises(CommandError, match="invalid choice"):
        call_command("extract", "--model", model.pk, "--dataset", ds.pk, "--layers", "0",
                     "--hooks", "mlp", "--format", "hdf5")  # fmt: skip
    assert not ExtractionJob.objects.exists()


def test_the_modal_offers_the_choice_and_a_template_carries_it(client, ready):
    model, ds = ready
    page = client.get(f"/models/{model.pk}/extract", **HX).content.decode()
    assert 'name="output_format"' in page and 'value="safetensors+saelens"' in page
    assert 'id="extract-estimate"' in page
    r = client.post("/templates/save", {"name": "for sae", "layers": ["0"],
                    "hook_types": ["mlp"], "output_format": SAE}, **HX)  # fmt: skip
    assert r.status_code == 201, r.content
    template = ExtractionTemplate.objects.get(name="for sae")
    assert template.output_format == SAE
    page = client.get(f"/models/{model.pk}/extract?template={template.pk}", **HX).content.decode()
    assert f'<option value="{SAE}" selected>' in page
    form = {"dataset_id": ds.pk, "layers": ["0"], "hook_types": ["mlp"], "max_samples": "8",
            "context_size": "16", "output_format": SAE}  # fmt: skip
    assert client.post(f"/models/{model.pk}/extract/start", form, **HX).status_code == 202
    assert ExtractionJob.objects.get().output_format == SAE


def test_cli_format_writes_the_saelens_folder(ready, tmp_path, capsys):
    model, ds = ready
    out = tmp_path / "acts"
    call_command("extract", "--model", model.pk, "--dataset", ds.pk, "--layers", "1",
                 "--hooks", "residual", "--max-samples", "8", "--context-size", "16",
                 "--format", SAE, "--out", str(out))  # fmt: skip
    assert f"SAELens folder: {out.resolve() / 'saelens'}" in capsys.readouterr().out
    assert_saelens_folder(ExtractionJob.objects.get(), out.resolve() / "saelens")


def test_export_via_the_api_ends_completed_with_the_path(client, ready):
    model, ds = ready
    job = extract(model, ds, **{k: v for k, v in BODY.items() if k != "layers"}, layers=[1])
    assert job.status == "completed" and job.saelens_export is None
    r = post(client, f"/api/extractions/{job.pk}/export", {"format": "saelens"})
    assert r.status_code == 202 and r.json()["status"] == "queued", r.content
    again = post(client, f"/api/extractions/{job.pk}/export", {"format": "saelens"})
    assert again.status_code == 409 and "being exported" in again.json()["detail"]
    tasks.extraction_export_task(job.pk)
    export = client.get(f"/api/extractions/{job.pk}").json()["export"]
    assert export["status"] == "completed" and export["progress"] == 100.0, export
    assert export["path"] == str(Path(job.output_path) / "saelens")
    assert_saelens_folder(job, Path(export["path"]))
    assert post(client, f"/api/extractions/{job.pk}/export", {}).status_code == 409
    # the card's push shows the path (the page swaps it in, no reload)
    assert export["path"] in card_html(model.pk)


def test_export_refusals_and_a_failing_export_leave_no_folder(client, ready):
    model, ds = ready
    r = post(client, "/api/extractions/x_nope/export", {"format": "saelens"})
    assert r.status_code == 404
    job = extract(model, ds, layers=[0], hook_types=["mlp"], max_samples=8, context_size=16)
    assert post(client, f"/api/extractions/{job.pk}/export", {"format": "zarr"}).status_code == 422
    queued = ExtractionJob.objects.create(
        model=model, dataset=ds, layers=[0], hook_types=["mlp"], batch_size=1, max_samples=1,
        context_size=16, output_path=str(Path(job.output_path).parent / "q"),
    )  # fmt: skip
    r = post(client, f"/api/extractions/{queued.pk}/export", {"format": "saelens"})
    assert r.status_code == 409 and "only a completed one" in r.json()["detail"]
    # an altered shard: the export ends failed with the reason, and no folder
    shard = Path(job.output_path) / job.manifest["hooks"][0]["shards"][0]["file"]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert post(client, f"/api/extractions/{job.pk}/export", {}).status_code == 202
    tasks.extraction_export_task(job.pk)
    export = ExtractionExport.objects.get(pk=job.pk)
    assert export.status == "failed" and "sha256" in export.error_message
    assert not (Path(job.output_path) / "saelens").exists()
    assert sorted(p.name for p in Path(job.output_path).iterdir()) == ["manifest.json", "shards"]
    # a failed export may be tried again (and fails again, truthfully)
    assert post(client, f"/api/extractions/{job.pk}/export", {}).status_code == 202


def test_deleting_the_extraction_removes_a_queued_export(client, ready):
    model, ds = ready
    job = extract(model, ds, layers=[0], hook_types=["mlp"], max_samples=8, context_size=16)
    assert post(client, f"/api/extractions/{job.pk}/export", {}).status_code == 202
    assert client.delete(f"/api/extractions/{job.pk}").status_code == 204
    tasks.extraction_export_task(job.pk)  # its task arrives after: nothing to do, nothing written
    assert not ExtractionExport.objects.exists() and not Path(job.output_path).exists()


def test_a_stale_export_is_ended_and_its_folder_removed(client, ready):
    model, ds = ready
    job = extract(model, ds, layers=[0], hook_types=["mlp"], max_samples=8, context_size=16)
    assert post(client, f"/api/extractions/{job.pk}/export", {}).status_code == 202
    folder = Path(job.output_path) / "saelens"
    folder.mkdir()
    (folder / "data-00000-of-00001.arrow").write_bytes(b"partial")
    long_ago = timezone.now() - timedelta(hours=1)
    ExtractionExport.objects.filter(pk=job.pk).update(status="running", heartbeat_at=long_ago)
    assert reconcile.jobs_reconcile() == 1
    export = ExtractionExport.objects.get(pk=job.pk)
    assert export.status == "failed" and "signs of life" in export.error_message
    assert not folder.exists() and (Path(job.output_path) / "manifest.json").exists()


def test_the_size_estimate_equals_the_bytes_written(client, ready):
    model, ds = ready
    body = {**BODY, "max_samples": 20, "output_format": SAE}
    # the dataset gives more than max_samples sequences: its size does not lower the bound
    est = post(client, f"/api/models/{model.pk}/extract-estimate", {**body, "dataset_id": ds.pk})
    est = est.json()
    assert est["n_tokens"] == 20 * 32 and est["n_sites"] == 4
    d, b = est["d"], est["bytes_per_element"]  # float32 on CPU, bfloat16 on a GPU
    assert b == (4 if device().type == "cpu" else 2)
    assert est["shard_bytes"] == 20 * 4 * 32 * (d * b + 4)
    assert est["saelens_bytes"] == 20 * 32 * (4 * d * 4 + 4)
    assert est["output_bytes"] == est["shard_bytes"] + est["saelens_bytes"]
    assert est["needed_bytes"] == est["shard_bytes"] + 2 * est["saelens_bytes"] and est["fits"]
    r = post(client, f"/api/models/{model.pk}/extract-activations", {**body, "dataset_id": ds.pk})
    tasks.extraction_run_task(r.json()["extraction_id"])
    job = ExtractionJob.objects.get()
    assert job.status == "completed" and job.tokens_total == 20 * 32, job.error_message
    tensors = sum(
        t.numel() * t.element_size()
        for h in job.manifest["hooks"]
        for s in h["shards"]
        for t in load_file(Path(job.output_path) / s["file"]).values()
    )
    assert tensors == est["shard_bytes"]  # the data itself, byte for byte
    files = [s for h in job.manifest["hooks"] for s in h["shards"]]
    overhead = job.bytes_written - est["shard_bytes"]  # safetensors headers only
    assert 0 < overhead <= 1024 * len(files)
    arrow = job.saelens_export.bytes_written
    assert est["saelens_bytes"] <= arrow <= est["saelens_bytes"] + 64 * 1024


def test_the_modal_shows_the_size_and_refuses_what_will_not_fit(client, ready, settings):
    model, ds = ready
    url = f"/models/{model.pk}/extract/estimate"
    form = {"dataset_id": ds.pk, "layers": ["0", "1"], "hook_types": ["residual"],
            "max_samples": "100000", "context_size": "32"}  # fmt: skip
    page = client.post(url, form, **HX).content.decode()
    assert 'data-fits="true"' in page and "free" in page and "tokens" in page
    est = post(client, f"/api/models/{model.pk}/extract-estimate",
               {"layers": [0, 1], "hook_types": ["residual"], "max_samples": 100000,
                "context_size": 32, "output_format": SAE, "dataset_id": ds.pk}).json()  # fmt: skip
    assert est["n_sequences"] < 100000  # bounded by the dataset's size, as the modal's line is
    # a margin (the settings knob) that leaves room for the shards but not the SAELens folder
    settings.DISK_MARGIN_BYTES = est["free_bytes"] - est["shard_bytes"] - est["saelens_bytes"]
    assert 'data-fits="true"' in client.post(url, form, **HX).content.decode()
    page = client.post(url, {**form, "output_format": SAE}, **HX).content.decode()
    assert 'data-fits="false"' in page and "will not fit" in page
    r = client.post(f"/models/{model.pk}/extract/start", {**form, "output_format": SAE}, **HX)
    assert r.status_code == 422 and "Not enough disk space" in r.content.decode()
    assert not ExtractionJob.objects.exists()
    # an incomplete form is not an error: the line says what is missing
    r = client.post(url, {**form, "layers": []}, **HX)
    assert r.status_code == 200 and 'data-fits="unknown"' in r.content.decode()


def test_an_export_that_cannot_fit_is_refused(client, ready, settings):
    model, ds = ready
    job = extract(model, ds, layers=[0], hook_types=["mlp"], max_samples=8, context_size=16)
    settings.DISK_MARGIN_BYTES = shutil.disk_usage(job.output_path).free
    r = post(client, f"/api/extractions/{job.pk}/export", {})
    assert r.status_code == 422 and r.json()["code"] == "disk_full"
    assert not ExtractionExport.objects.exists()


def test_the_button_queues_the_export_and_answers_its_state(client, ready):
    model, ds = ready
    job = extract(model, ds, layers=[0], hook_types=["mlp"], max_samples=8, context_size=16)
    history = client.get(f"/models/{model.pk}/extractions").content.decode()
    assert "Export for SAELens" in history
    r = client.post(f"/models/extractions/{job.pk}/export", **HX)
    assert r.status_code == 202 and 'data-export="queued"' in r.content.decode()
    r = client.post(f"/models/extractions/{job.pk}/export", **HX)
    assert r.status_code == 409 and "being exported" in r.content.decode()
    tasks.extraction_export_task(job.pk)
    assert 'data-export="completed"' in card_html(model.pk)
