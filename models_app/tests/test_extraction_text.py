"""What the dataset's text holds, through the real job: the special-token policy chosen in the API,
the modal, the CLI and a template, and a line too long to hold, read by the GPU worker's path.
The ids written are checked against the model's own tokenizer on each whole document."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from django.core.management import call_command
from django.urls import reverse
from safetensors.torch import load_file
from transformers import AutoTokenizer

from datasets_app.formats import LINE_PIECE_BYTES
from models_app import tasks
from models_app.models import ExtractionJob, ExtractionStatus
from models_app.tests.ml.test_text import reference_sequences

from .helpers import download, extract, text_dataset

pytestmark = pytest.mark.django_db(transaction=True)
HX = {"HTTP_HX_REQUEST": "true"}
BOS, EOS = "<|bos|>", "<|endoftext|>"  # the tiny repos' special tokens
CHAT = [
    f"{BOS}User: where does the train go{EOS}Assistant: to the city at noon{EOS}",
    f"{BOS}User: what is a token{EOS}Assistant: a piece of a word{EOS}",
    f"{BOS}User: count the boats{EOS}Assistant: one, two, three{EOS}",
] * 8


def _ids(job: ExtractionJob) -> list[list[int]]:
    hook = job.manifest["hooks"][0]
    out = Path(job.output_path)
    return torch.cat([load_file(out / s["file"])["token_ids"] for s in hook["shards"]]).tolist()


def _tokenizer(model):
    return AutoTokenizer.from_pretrained(model.local_path)


@pytest.mark.parametrize("repo", ["tiny/llama", "tiny/gpt2"])
@pytest.mark.parametrize("policy", ["text", "parse"])
def test_the_api_takes_the_policy_and_the_job_writes_the_tokenizers_ids(client, hub, repo, policy):
    model, ds = download(repo, "FP16"), text_dataset("chat", CHAT)
    body = {
        "dataset_id": ds.pk, "layers": [0], "hook_types": ["residual"], "batch_size": 4,
        "max_samples": 10, "context_size": 16, "special_tokens": policy,
    }  # fmt: skip
    r = client.post(
        f"/api/models/{model.pk}/extract-activations", json.dumps(body), "application/json"
    )
    assert r.status_code == 202
    tasks.extraction_run_task(r.json()["extraction_id"])
    got = client.get(f"/api/extractions/{r.json()['extraction_id']}").json()
    assert got["status"] == "completed" and got["special_tokens"] == policy
    assert got["manifest"]["special_tokens"] == policy
    job = ExtractionJob.objects.get()
    tok = _tokenizer(model)
    assert _ids(job) == reference_sequences(tok, CHAT, 16, policy)[:10]
    bos = tok.convert_tokens_to_ids(BOS)
    later = [i for seq in _ids(job) for i in seq[1:]]
    pairs = [(a, b) for seq in _ids(job) for a, b in zip(seq, seq[1:], strict=False)]
    if policy == "text":  # the strings are characters: no BOS after position 0
        assert bos not in later
    else:  # the data's own BOS where a document starts inside a sequence, never doubled
        assert bos in later and (bos, bos) not in pairs


def test_an_unknown_policy_is_a_422_and_creates_nothing(client, hub):
    model, ds = download("tiny/gpt2", "FP16"), text_dataset()
    body = {"dataset_id": ds.pk, "layers": [0], "hook_types": ["residual"], "special_tokens": "x"}
    r = client.post(
        f"/api/models/{model.pk}/extract-activations", json.dumps(body), "application/json"
    )
    assert r.status_code == 422 and ExtractionJob.objects.count() == 0


def test_the_modal_offers_the_policy_and_starts_with_it(client, hub):
    from templates_app.services import template_create

    model, ds = download("tiny/llama", "FP16"), text_dataset("chat", CHAT)
    url = reverse("models:extract", args=[model.pk])
    page = client.get(url, **HX).content.decode()
    assert 'name="special_tokens"' in page and '<option value="text" selected>' in page
    t = template_create(
        name="chat", description="", layers=[1], hook_types=["residual"], max_samples=4,
        batch_size=2, context_size=16, special_tokens="parse",
    )  # fmt: skip
    page = client.get(f"{url}?template={t.id}", **HX).content.decode()
    assert '<option value="parse" selected>' in page
    data = {
        "dataset_id": ds.pk, "layers": ["0"], "hook_types": ["residual"], "batch_size": "2",
        "max_samples": "4", "context_size": "16", "special_tokens": "parse",
    }  # fmt: skip
    r = client.post(reverse("models:extract_start", args=[model.pk]), data, **HX)
    assert r.status_code == 202 and ExtractionJob.objects.get().special_tokens == "parse"


def test_the_cli_takes_the_policy_and_a_template_carries_it(hub):
    from templates_app.services import template_create

    model, ds = download("tiny/llama", "FP16"), text_dataset("chat", CHAT)
    call_command(
        "extract", model=model.pk, dataset=ds.pk, layers="0", hooks="residual", max_samples=2,
        context_size=16, special_tokens="parse",
    )  # fmt: skip
    template_create(
        name="chat", description="", layers=[1], hook_types=["residual"], max_samples=2,
        batch_size=2, context_size=16, special_tokens="parse",
    )  # fmt: skip
    call_command("extract", model=model.pk, dataset=ds.pk, template="chat")
    call_command(
        "extract", model=model.pk, dataset=ds.pk, layers="0", hooks="residual", max_samples=2,
        context_size=16,
    )  # fmt: skip
    jobs = ExtractionJob.objects.order_by("created_at")
    assert [j.status for j in jobs] == [ExtractionStatus.COMPLETED] * 3
    assert [j.special_tokens for j in jobs] == ["parse", "parse", "text"]
    assert [j.manifest["special_tokens"] for j in jobs] == ["parse", "parse", "text"]


@pytest.mark.parametrize("repo", ["tiny/llama", "tiny/gpt2"])
def test_a_line_longer_than_a_read_piece_gives_the_ids_of_the_whole_text(hub, repo):
    sentence = "The quick brown fox jumps over the lazy dog while the cat sleeps. "
    long_line = sentence * (3 * LINE_PIECE_BYTES // len(sentence))  # read in several pieces
    lines = ["a short first document", long_line, "a short last document"]
    model, ds = download(repo, "FP16"), text_dataset("long", lines)
    n = 3 * LINE_PIECE_BYTES // 4 // 32  # sequences enough to go past the first read piece
    job = extract(model, ds, layers=[0], hook_types=["residual"], max_samples=n, batch_size=64)
    assert job.status == ExtractionStatus.COMPLETED, job.error_message
    assert _ids(job) == reference_sequences(_tokenizer(model), lines, 32, "text")[:n]


def test_the_kernel_and_the_ml_layer_name_the_same_policies():
    from mistudio import limits
    from models_app.ml import tokens

    assert limits.SPECIAL_TOKENS == tokens.SPECIAL_TOKENS
    assert limits.DEFAULT_SPECIAL_TOKENS == tokens.DEFAULT_SPECIAL_TOKENS
    assert set(limits.SPECIAL_TOKENS_LABELS) == set(limits.SPECIAL_TOKENS)
