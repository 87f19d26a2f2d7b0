"""The new sites through the app: service, API, modal, CLI, templates, on Hub-shaped repos
(Gemma-2, OLMo-2, Falcon-7B layouts), checked against plain transformers with cloning hooks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from django.core.management import CommandError, call_command
from django.urls import reverse
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from mistudio.errors import Invalid
from models_app import extraction
from models_app.ml.storage import verify
from models_app.models import ExtractionJob, ExtractionStatus
from templates_app.services import template_create

from .helpers import download, extract, text_dataset
from .ml.test_sites import REF, assert_statistics_match, reference

pytestmark = pytest.mark.django_db(transaction=True)
HX = {"HTTP_HX_REQUEST": "true"}
ALL_TYPES = ["residual", "mlp", "attention", "resid_pre", "z", "ln_final"]
ARCH = {"shapes/gemma2": "gemma2", "shapes/olmo2": "olmo2", "shapes/falcon": "falcon"}


def _inner(repo: str) -> str:
    blocks, *_, inner = REF[ARCH[repo]]
    return f"{blocks}.1.{inner}"


def _check_job(job: ExtractionJob, repo: str) -> None:
    """Shards and statistics of every site == plain transformers with cloning hooks."""
    assert job.status == ExtractionStatus.COMPLETED, job.error_message
    out = Path(job.output_path)
    assert verify(out) == []
    manifest = json.loads((out / "manifest.json").read_text())
    ref_model = AutoModelForCausalLM.from_pretrained(job.model.local_path, dtype=torch.float32)
    first = manifest["hooks"][0]["shards"]
    refs = []
    for k in range(len(first)):
        ids = load_file(out / first[k]["file"])["token_ids"].long()
        refs.append(reference(ref_model.eval(), ARCH[repo], ids))
    for hook in manifest["hooks"]:
        for shard, ref in zip(hook["shards"], refs, strict=True):
            got = load_file(out / shard["file"])["activations"]
            torch.testing.assert_close(got, ref[hook["name"]], rtol=0, atol=0)
        assert_statistics_match(hook["statistics"], torch.cat([r[hook["name"]] for r in refs]))
        assert job.statistics[hook["name"]] == hook["statistics"]


@pytest.mark.parametrize("repo", list(ARCH))
def test_every_site_of_a_post_norm_or_parallel_repo_matches_transformers(hub, shapes, repo):
    row = download(repo, "FP16")
    module_sites = [{"path": _inner(repo), "io": io} for io in ("input", "output")]
    job = extract(row, text_dataset(), hook_types=ALL_TYPES, module_sites=module_sites,
                  max_samples=8, batch_size=4, context_size=16)  # fmt: skip
    names = {h["name"] for h in job.manifest["hooks"]}
    assert names == {
        *(f"blocks.{i}.hook_{t}" for i in (0, 1)
          for t in ("resid_pre", "resid_post", "attn_out", "mlp_out")),
        "blocks.0.attn.hook_z", "blocks.1.attn.hook_z", "ln_final.hook_normalized",
        f"{_inner(repo)}.hook_input", f"{_inner(repo)}.hook_output",
    }  # fmt: skip
    assert job.module_sites == module_sites and job.manifest["self_check"]["passed"]
    _check_job(job, repo)


def test_a_module_path_that_does_not_exist_is_a_422_naming_the_closest(client, hub, shapes):
    row, ds = download("shapes/gemma2", "FP16"), text_dataset()
    body = {"dataset_id": ds.pk, "layers": [0], "hook_types": ["residual"],
            "module_sites": [{"path": "model.layers.1.mlp.down_prj", "io": "output"}]}  # fmt: skip
    r = client.post(f"/api/models/{row.pk}/extract-activations", json.dumps(body),
                    content_type="application/json")  # fmt: skip
    assert r.status_code == 422
    assert "model.layers.1.mlp.down_proj" in r.json()["detail"]
    with pytest.raises(Invalid, match="int64, not activations"):
        extraction.extraction_start(
            model_id=row.pk, dataset_id=ds.pk, layers=[0], hook_types=["residual"],
            batch_size=2, max_samples=2,
            module_sites=[{"path": "model.embed_tokens", "io": "input"}],
        )  # fmt: skip
    assert not ExtractionJob.objects.exists()


def test_the_sites_api_shows_each_site_with_its_module_and_shape(client, hub, shapes):
    row = download("shapes/gemma2", "FP16")
    body = {"layers": [1], "hook_types": ["z", "mlp", "ln_final"],
            "module_sites": [{"path": "model.layers.1.mlp.up_proj", "io": "output"}]}  # fmt: skip
    r = client.post(f"/api/models/{row.pk}/sites", json.dumps(body),
                    content_type="application/json")  # fmt: skip
    assert r.status_code == 200, r.content
    got = {s["name"]: (s["module_path"], s["reads"], s["shape"]) for s in r.json()}
    assert got == {
        "blocks.1.hook_mlp_out": ("model.layers.1.post_feedforward_layernorm", "output", [128]),
        "blocks.1.attn.hook_z": ("model.layers.1.self_attn.o_proj", "input", [4, 64]),
        "ln_final.hook_normalized": ("model.norm", "output", [128]),
        "model.layers.1.mlp.up_proj.hook_output": ("model.layers.1.mlp.up_proj", "output", [256]),
    }
    bad = client.post(f"/api/models/{row.pk}/sites", json.dumps({"layers": [5]}),
                      content_type="application/json")  # fmt: skip
    assert bad.status_code == 422 and "do not exist" in bad.json()["detail"]


def test_the_modal_checks_sites_and_starts_with_a_module_path(client, hub, shapes):
    row, ds = download("shapes/olmo2", "FP16"), text_dataset()
    modal = client.get(reverse("models:extract", args=[row.pk]), **HX).content.decode()
    for label in ("Block Input", "Attention Heads (z)", "Final Norm Output", "module paths"):
        assert label in modal
    form = {"dataset_id": ds.pk, "layers": ["1"], "hook_types": ["z", "attention"],
            "module_sites": "model.layers.1.mlp.down_proj input\n\n", "batch_size": "2",
            "max_samples": "2", "context_size": "8"}  # fmt: skip
    shown = client.post(reverse("models:sites_check", args=[row.pk]), form, **HX)
    text = shown.content.decode()
    assert shown.status_code == 200 and "model.layers.1.post_attention_layernorm" in text
    assert "[4, 32]" in text and "model.layers.1.mlp.down_proj.hook_input" in text
    bad = client.post(reverse("models:sites_check", args=[row.pk]),
                      {**form, "module_sites": "model.layers.1.nope"}, **HX)  # fmt: skip
    assert bad.status_code == 422 and "has no module" in bad.content.decode()
    r = client.post(reverse("models:extract_start", args=[row.pk]), form, **HX)
    assert r.status_code == 202
    job = ExtractionJob.objects.get()
    assert job.module_sites == [{"path": "model.layers.1.mlp.down_proj", "io": "input"}]
    assert job.hook_types == ["attention", "z"]


def test_a_template_carries_the_new_sites_to_the_modal_and_the_cli(client, hub, shapes, tmp_path):
    row, ds = download("shapes/falcon", "FP16"), text_dataset()
    sites = [{"path": "transformer.h.1.mlp.dense_4h_to_h", "io": "output"}]
    template = template_create(name="falcon sites", description="", layers=[0, 1],
                               hook_types=["mlp", "z", "resid_pre"], module_sites=sites,
                               max_samples=4, batch_size=2, context_size=16)  # fmt: skip
    modal = client.get(reverse("models:extract", args=[row.pk]) + f"?template={template.pk}")
    assert "transformer.h.1.mlp.dense_4h_to_h output</textarea>" in modal.content.decode()
    module = ["transformer.h.0.mlp.dense_h_to_4h:input"]
    call_command("extract", model=row.pk, dataset=ds.pk, template="falcon sites",
                 module=module, out=str(tmp_path / "o"))  # fmt: skip
    job = ExtractionJob.objects.get()
    assert job.status == ExtractionStatus.COMPLETED, job.error_message
    assert job.module_sites == [{"path": "transformer.h.0.mlp.dense_h_to_4h", "io": "input"}]
    assert job.hook_types == ["mlp", "resid_pre", "z"]
    with pytest.raises(CommandError, match="should be 'output' or 'input'"):
        call_command("extract", model=row.pk, dataset=ds.pk, layers="0", hooks="z",
                     module=["transformer.h.0.mlp:inside"])  # fmt: skip
