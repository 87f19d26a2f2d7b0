"""`manage.py download` and `manage.py models`: the app's preflight, progress and load check from a
terminal; a token only from HF_TOKEN or a prompt, never an argument. A command-line run never
marks a model as loaded in the GPU worker (that worker did not load it)."""

from __future__ import annotations

import pytest
from django.core.management import CommandError, call_command

from conftest import GOOD_TOKEN
from models_app.models import ExtractionJob, HubCredential, Model, ModelStatus

from .helpers import download, text_dataset

pytestmark = pytest.mark.django_db(transaction=True)


def test_download_fetches_checks_and_reports_the_model(hub, capsys):
    call_command("download", "tiny/llama", quantization="Q4")
    row = Model.objects.get()
    assert (row.status, row.quantization, row.quant_backend) == ("ready", "Q4", "bitsandbytes-nf4")
    assert not row.is_loaded and row.loaded_device == ""  # this process is not the GPU worker
    out = capsys.readouterr()
    assert f"{row.pk}: tiny/llama [Q4] ready" in out.out
    assert "download tiny/llama" in out.err and "100%" in out.err  # the tqdm bar


def test_download_of_a_gated_repo_without_a_token_says_how_to_give_one(hub):
    with pytest.raises(CommandError) as err:
        call_command("download", "tiny/gated-llama", quantization="FP16")
    assert "accept the licence" in str(err.value) and "HF_TOKEN" in str(err.value)
    assert not Model.objects.exists()


def test_download_takes_the_token_from_hf_token_and_keeps_it_nowhere(hub, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", GOOD_TOKEN)
    call_command("download", "tiny/gated-llama", quantization="FP16")
    row = Model.objects.get()
    assert row.status == ModelStatus.READY, row.error_message
    out = capsys.readouterr()
    assert GOOD_TOKEN not in out.out + out.err and not HubCredential.objects.exists()


def test_there_is_no_token_argument(hub):
    with pytest.raises((CommandError, SystemExit)):
        call_command("download", "tiny/llama", "--token", GOOD_TOKEN)


def test_download_refusals_exit_with_the_message_and_change_nothing(hub):
    for repo, words in (("tiny/missing", "not found"), ("tiny/pickle-only", "pickle")):
        with pytest.raises(CommandError) as err:
            call_command("download", repo, quantization="Q8")
        assert words in str(err.value)
    with pytest.raises(CommandError):
        call_command("download", "not a repo id!", quantization="Q8")
    assert not Model.objects.exists()


def test_models_lists_what_the_models_page_shows(hub, capsys):
    call_command("models")
    assert "No models yet" in capsys.readouterr().out
    row = download("tiny/gpt2", "Q8")
    call_command("models")
    out = capsys.readouterr().out
    assert row.pk in out and "tiny/gpt2" in out and "Q8" in out and "ready" in out
    call_command("models", status="error")
    assert row.pk not in capsys.readouterr().out
    with pytest.raises(CommandError):
        call_command("models", status="bogus")


def test_a_cli_extraction_leaves_the_loaded_model_as_the_worker_has_it(hub):
    loaded, other = download("tiny/gpt2", "FP16"), download("tiny/llama", "FP16")
    loaded.refresh_from_db()
    assert (loaded.is_loaded, other.is_loaded) == (False, True)  # the last download is resident
    Model.objects.filter(pk=other.pk).update(is_loaded=False)  # the worker unloaded it
    Model.objects.filter(pk=loaded.pk).update(is_loaded=True)  # and loaded this one
    text_dataset()
    call_command(
        "extract", model="tiny/llama", dataset="corpus", layers="0", hooks="residual",
        max_samples=2, context_size=16, batch_size=2,
    )  # fmt: skip
    assert ExtractionJob.objects.get().status == "completed"
    assert list(Model.objects.filter(is_loaded=True).values_list("pk", flat=True)) == [loaded.pk]


@pytest.mark.parametrize(("repo_id", "quantization"), [("tiny/gpt2", "Q4"), ("tiny/qwen2", "Q8")])
def test_a_cli_extraction_of_a_model_never_loaded_in_the_ui_marks_nothing_loaded(
    client, hub, repo_id, quantization
):
    """The issue's case: `manage.py extract --model R --quantization Q` on a model the UI never
    loaded, while another is resident: one resident model per device, and the API, the card and
    the header all still say which one."""
    call_command("download", repo_id, quantization=quantization)  # a CLI download: not resident
    resident = download("tiny/llama", "FP16")  # the GPU worker's model
    assert list(Model.objects.filter(is_loaded=True).values_list("pk", flat=True)) == [resident.pk]
    text_dataset()
    call_command(
        "extract", model=repo_id, quantization=quantization, dataset="corpus", layers="0",
        hooks="residual", max_samples=2, context_size=16, batch_size=2,
    )  # fmt: skip
    assert ExtractionJob.objects.get().status == "completed"
    api = {m["hf_repo_id"]: m["is_loaded"] for m in client.get("/api/models").json()}
    assert api == {repo_id: False, "tiny/llama": True}
    badge = client.get("/models/device").content.decode()
    assert f"loaded: {resident.name} [FP16]" in badge and repo_id.split("/")[1] not in badge
    page = client.get("/models/").content.decode()
    assert page.count('data-loaded="true"') == 1 and page.count("Ready · loaded") == 1
