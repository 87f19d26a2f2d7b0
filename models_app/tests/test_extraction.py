"""Extraction jobs end to end: a downloaded tiny model, an uploaded dataset, shards on disk."""

from __future__ import annotations

import io
import json
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from django.utils import timezone
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from mistudio.errors import Conflict, Invalid
from models_app import extraction, parts, reconcile, services, tasks
from models_app.ml.storage import verify
from models_app.models import ExtractionExport, ExtractionJob, ExtractionStatus

from .helpers import download, extract, in_thread, text_dataset, wait_for

pytestmark = pytest.mark.django_db(transaction=True)


def reference_hidden_states(model_row, token_ids: torch.Tensor) -> tuple:
    ref = AutoModelForCausalLM.from_pretrained(model_row.local_path, dtype=torch.float32)
    with torch.no_grad():
        return ref(token_ids.long(), output_hidden_states=True).hidden_states


@pytest.mark.parametrize("repo", ["tiny/gpt2", "tiny/llama"])
def test_residuals_on_disk_match_the_reference_forward(hub, repo):
    row = download(repo, "FP16")
    job = extract(row, text_dataset())
    assert job.status == ExtractionStatus.COMPLETED, job.error_message
    out = Path(job.output_path)
    assert verify(out) == [] and (out / "manifest.json").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["quantization"] == "FP16" and manifest["context_size"] == 32
    assert {h["name"] for h in manifest["hooks"]} == {
        f"blocks.{i}.hook_{k}" for i in (0, 1) for k in ("resid_post", "mlp_out", "attn_out")
    }
    shard = load_file(out / "shards" / "blocks.0.hook_resid_post" / "000000.safetensors")
    assert shard["activations"].shape == (12, 32, 128) and shard["token_ids"].dtype == torch.int32
    hidden = reference_hidden_states(row, shard["token_ids"])
    torch.testing.assert_close(shard["activations"], hidden[1], rtol=1e-4, atol=1e-4)
    assert job.tokens_done == job.tokens_total == 12 * 32 and job.progress == 100.0
    assert set(job.statistics) == {h["name"] for h in manifest["hooks"]}


def test_it_extracts_with_the_downloaded_quantization(hub):
    row = download("tiny/llama", "Q4")
    job = extract(row, text_dataset(), hook_types=["residual"])
    assert job.status == ExtractionStatus.COMPLETED, job.error_message
    assert job.manifest["model"]["quantization"] == "Q4"
    assert job.manifest["meta"]["backend"] == "bitsandbytes-nf4"


def test_layers_and_context_are_checked_against_the_model(hub):
    row, ds = download("tiny/gpt2", "FP16"), text_dataset()
    with pytest.raises(Invalid, match="do not exist"):
        extraction.extraction_start(
            model_id=row.pk,
            dataset_id=ds.pk,
            layers=[0, 7],
            hook_types=["mlp"],
            batch_size=2,
            max_samples=4,
        )
    with pytest.raises(Invalid, match="Context size"):
        extraction.extraction_start(
            model_id=row.pk,
            dataset_id=ds.pk,
            layers=[0],
            hook_types=["mlp"],
            batch_size=2,
            max_samples=4,
            context_size=4096,
        )
    assert not ExtractionJob.objects.exists()


def test_a_model_that_is_not_ready_is_a_conflict(hub):
    ds = text_dataset()
    row = services.model_download(hf_repo_id="tiny/gpt2", quantization="Q8")
    with pytest.raises(Conflict):
        extraction.extraction_start(
            model_id=row.pk,
            dataset_id=ds.pk,
            layers=[0],
            hook_types=["residual"],
            batch_size=2,
            max_samples=4,
        )


def test_cancel_mid_run_leaves_no_partial_shard(hub):
    row = download("tiny/llama", "FP16")
    job = extraction.extraction_start(
        model_id=row.pk,
        dataset_id=text_dataset(lines=["word " * 400] * 400).pk,
        layers=[0, 1],
        hook_types=["residual"],
        batch_size=1,
        max_samples=400,
        context_size=64,
    )
    worker = in_thread(tasks.extraction_run_task, job.pk)
    wait_for(lambda: ExtractionJob.objects.get(pk=job.pk).tokens_done > 0)
    extraction.extraction_cancel(job.pk)
    worker.join(timeout=300)
    job.refresh_from_db()
    assert job.status == ExtractionStatus.CANCELLED
    assert not Path(job.output_path).exists()


@pytest.mark.parametrize("output_format", ["safetensors", "safetensors+saelens"])
def test_a_cancel_during_the_merge_ends_cancelled_or_is_refused(hub, output_format):
    """Every part has finished and the last one merges (it polls no cancel), while the cancel
    ends the row and removes the folder. A cancel the API accepts ends the job cancelled with
    nothing on disk and no export record, never `completed` over a removed folder; one it
    refuses (409: too late) leaves a whole, completed job."""
    row = download("tiny/llama", "FP16")
    job = extraction.extraction_start(
        model_id=row.pk, dataset_id=text_dataset(lines=["word " * 200] * 40).pk, layers=[0, 1],
        hook_types=["residual", "mlp", "attention", "resid_pre", "hook_z"], batch_size=4,
        max_samples=40, context_size=64, output_format=output_format,
    )  # fmt: skip
    worker = in_thread(tasks.extraction_run_task, job.pk)
    merging = ExtractionJob.objects.filter(pk=job.pk, phase=parts.MERGING)
    wait_for(lambda: merging.exists() or not worker.is_alive(), every=0)
    try:
        extraction.extraction_cancel(job.pk)
        accepted = True
    except Conflict:
        accepted = False
    worker.join(timeout=300)
    job.refresh_from_db()
    out = Path(job.output_path)
    if accepted:
        assert job.status == ExtractionStatus.CANCELLED, job.status
        assert not out.exists() and not ExtractionExport.objects.filter(extraction=job).exists()
    else:
        assert job.status == ExtractionStatus.COMPLETED and verify(out) == []


def test_an_unknown_dataset_id_is_refused(hub):
    row = download("tiny/gpt2", "FP16")
    with pytest.raises(Invalid):
        extraction.extraction_start(
            model_id=row.pk,
            dataset_id="d_nope",
            layers=[0],
            hook_types=["residual"],
            batch_size=2,
            max_samples=4,
        )


def test_a_dataset_shorter_than_one_sequence_fails_readably(hub):
    row = download("tiny/gpt2", "FP16")
    job = extract(row, text_dataset(lines=["hi"]), context_size=128)
    assert job.status == ExtractionStatus.FAILED and "fewer than" in job.error_message
    assert not Path(job.output_path).exists()


def test_a_job_whose_worker_died_while_preparing_it_is_resumed_then_failed_the_second_time(
    hub, settings
):
    row = download("tiny/gpt2", "FP16")
    job = extraction.extraction_start(
        model_id=row.pk,
        dataset_id=text_dataset().pk,
        layers=[0],
        hook_types=["residual"],
        batch_size=2,
        max_samples=4,
    )
    out = Path(job.output_path)
    (out / "shards").mkdir(parents=True)
    stale = timezone.now() - timedelta(minutes=10)
    ExtractionJob.objects.filter(pk=job.pk).update(
        status=ExtractionStatus.RUNNING, heartbeat_at=stale, attempt=1
    )
    assert reconcile.jobs_reconcile() == 1  # the first death: queued again, not failed
    job.refresh_from_db()
    assert (job.status, job.error_message) == (ExtractionStatus.QUEUED, "")
    ExtractionJob.objects.filter(pk=job.pk).update(
        status=ExtractionStatus.RUNNING, heartbeat_at=stale, attempt=2
    )
    assert reconcile.jobs_reconcile() == 1  # the same way twice: failed, files removed
    job.refresh_from_db()
    assert job.status == ExtractionStatus.FAILED and "stopped" in job.error_message
    assert not out.exists()
    tasks.extraction_run_task(job.pk)  # a late redelivery does nothing
    assert ExtractionJob.objects.get(pk=job.pk).status == ExtractionStatus.FAILED


def test_deleting_a_model_deletes_its_extractions_files(hub):
    row = download("tiny/gpt2", "FP16")
    job = extract(row, text_dataset(), hook_types=["residual"], layers=[0])
    assert Path(job.output_path).exists()
    services.model_delete(row.pk)
    assert not Path(job.output_path).exists() and not ExtractionJob.objects.exists()


def test_model_and_dataset_delete_wait_for_a_running_extraction(hub):
    from datasets_app.services import dataset_delete

    row, ds = download("tiny/gpt2", "FP16"), text_dataset()
    extraction.extraction_start(
        model_id=row.pk,
        dataset_id=ds.pk,
        layers=[0],
        hook_types=["residual"],
        batch_size=2,
        max_samples=4,
    )
    with pytest.raises(Conflict):
        services.model_delete(row.pk)
    with pytest.raises(Conflict):
        dataset_delete(ds.pk)


def test_delete_an_extraction_removes_its_files(hub):
    job = extract(download("tiny/gpt2", "FP16"), text_dataset(), layers=[1])
    extraction.extraction_delete(job.pk)
    assert not Path(job.output_path).exists() and not ExtractionJob.objects.exists()


def test_shards_are_capped_so_host_memory_stays_small(hub, settings):
    settings.EXTRACTION_SHARD_BYTES = 32 * (16 * 128 * 4 + 16 * 4)  # 32 sequences per shard
    job = extract(
        download("tiny/gpt2", "FP16"),
        text_dataset(),
        layers=[0],
        hook_types=["residual"],
        max_samples=70,
        context_size=16,
    )
    shards = job.manifest["hooks"][0]["shards"]
    assert [s["n_seq"] for s in shards] == [32, 32, 6]
    assert verify(Path(job.output_path)) == []


def test_export_activations_cli_writes_a_saelens_folder_equal_to_the_shards(hub, tmp_path):
    datasets = pytest.importorskip("datasets")
    from django.core.management import CommandError, call_command

    job = extract(download("tiny/gpt2", "FP16"), text_dataset(), layers=[1])
    site = "blocks.1.hook_resid_post"
    printed = io.StringIO()
    call_command("export_activations", job.pk, str(tmp_path / "sae"), "--sites", site,
                 stdout=printed)  # fmt: skip
    ds = datasets.load_from_disk(str(tmp_path / "sae")).with_format("torch")
    assert ds.column_names == [site, "token_ids"]
    shard = load_file(Path(job.output_path) / "shards" / site / "000000.safetensors")
    assert torch.equal(ds[: shard["activations"].shape[0]][site], shard["activations"])
    recipe = printed.getvalue()  # the SAELens config, filled in for this extraction's --sites
    _, ctx, width = shard["activations"].shape
    for part in ("model_name='tiny/gpt2'", f"hook_name='{site}'", "override_model=",
                 f"cached_activations_path='{tmp_path / 'sae'}'", f"d_in={width},",
                 f"context_size={ctx},"):  # fmt: skip
        assert part in recipe, recipe
    with pytest.raises(CommandError, match="already exists"):
        call_command("export_activations", job.pk, str(tmp_path / "sae"))
    with pytest.raises(
        CommandError, match="No site blocks.5.hook_resid_post in this extraction: it has"
    ):
        call_command(
            "export_activations", job.pk, str(tmp_path / "b"), "--sites", "blocks.5.hook_resid_post"
        )
    with pytest.raises(CommandError, match="not found|No extraction"):
        call_command("export_activations", "x_" + "0" * 32, str(tmp_path / "c"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "hf-cache", "sae"]


def test_the_manifest_holds_what_it_takes_to_redo_the_run(hub):
    import hashlib
    import importlib.metadata

    from datasets_app.storage import texts_path

    row = download("tiny/llama", "Q4")
    dataset = text_dataset()
    job = extract(row, dataset, hook_types=["residual"], batch_size=3)
    m = job.manifest
    assert m["model"]["repo"] == "tiny/llama" and m["model"]["commit"] == row.commit_sha
    assert m["model"]["revision"] == "main" and m["model"]["quantization"] == "Q4"
    assert m["tokenizer"]["name"] == "tiny/llama"  # a repo id, not a path in the cache
    assert m["tokenizer"]["revision"] == row.commit_sha
    sha = hashlib.sha256(texts_path(dataset.pk).read_bytes()).hexdigest()
    assert m["dataset"]["texts_sha256"] == sha and m["dataset"]["name"] == dataset.name
    assert m["dataset"]["source"] == "upload" and m["dataset"]["rows"] == dataset.row_count
    assert m["batch_size"]["requested"] == 3 and m["context_size"] == job.context_size
    libs = m["environment"]["python_libraries"]
    assert libs["torch"] == importlib.metadata.version("torch")
    assert libs["transformers"] == importlib.metadata.version("transformers")
    assert libs["bitsandbytes"] == importlib.metadata.version("bitsandbytes")
    assert m["environment"]["device"] == "cpu" and m["bos_policy"]
