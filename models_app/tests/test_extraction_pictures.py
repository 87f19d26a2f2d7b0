"""Pictures of what was extracted: the norm-by-layer chart and the token view, checked against the
shards read directly with safetensors and the tokenizer loaded by transformers itself."""

from __future__ import annotations

import re
from html import unescape
from pathlib import Path

import pytest
import torch
from django.urls import reverse
from safetensors.torch import load_file
from transformers import AutoTokenizer

from models_app.templatetags.mistudio_charts import norm_series

from .helpers import download, extract, text_dataset

pytestmark = pytest.mark.django_db(transaction=True)
HX = {"HTTP_HX_REQUEST": "true"}


@pytest.fixture
def job(hub):
    model = download("tiny/llama", "FP16")
    return extract(model, text_dataset(), hook_types=["residual", "mlp", "attention"],
                   layers=[0, 1])  # fmt: skip


def _norm(stats: dict, site: str, key: str) -> float:
    return stats[site]["norm"][key]


def test_history_draws_norm_by_layer_with_axes_one_line_per_hook_type(client, job):
    page = client.get(reverse("models:extractions", args=[job.model_id])).content.decode()
    chart = re.search(r'<svg class="norm-chart".*?</svg>', page, re.S).group(0)
    # one solid (mean) and one dashed (p99) line per hook type
    titles = re.findall(r"<title>(hook_\w+ (?:mean|p99))</title>", chart)
    assert sorted(titles) == sorted(
        f"hook_{h} {k}" for h in ("resid_post", "attn_out", "mlp_out") for k in ("mean", "p99")
    )
    assert ">layer<" in chart and "‖x‖₂" in chart and re.search(r">0<", chart)
    assert re.search(r'text-anchor="middle">1</text>', chart)  # the x ticks are the layers
    top = max(_norm(job.statistics, s, "p99") for s in job.statistics) * 1.05
    assert f">{top:.3g}<" in chart  # the y range is labelled
    series = norm_series(job.statistics)
    assert [p[0] for p in series["resid_post"]] == [0, 1]
    assert series["mlp_out"][1][1] == _norm(job.statistics, "blocks.1.hook_mlp_out", "mean")
    hist = re.search(r'<svg class="histogram.*?</svg>', page, re.S).group(0)
    assert ">value<" in hist and "n≤" in hist  # histograms have their axes too


def test_the_token_view_shades_each_token_by_its_norm_at_the_chosen_site(client, job):
    site = "blocks.1.hook_mlp_out"
    page = client.get(reverse("models:extraction_tokens", args=[job.pk]), {"site": site})
    assert page.status_code == 200
    html = page.content.decode()
    shard = load_file(Path(job.output_path) / "shards" / site / "000000.safetensors")
    want = shard["activations"][:4].norm(dim=-1)  # [4, T]
    got = [float(v) for v in re.findall(r'data-norm="([-0-9.]+)"', html)]
    assert len(got) == want.numel()
    torch.testing.assert_close(torch.tensor(got).view_as(want), want, atol=1e-4, rtol=0)
    tok = AutoTokenizer.from_pretrained(job.model.local_path)
    texts = [unescape(t) for t in re.findall(r'<span class="token[^"]*"[^>]*>([^<]*)</span>', html)]
    ids = shard["token_ids"][:4].flatten().tolist()
    assert texts == [tok.decode([i]).replace("\n", "⏎") for i in ids]
    assert html.count("outline-amber-400") >= 4  # BOS at position 0 of each sequence
    assert f'value="{site}" selected' in html
    frag = client.get(reverse("models:extraction_tokens", args=[job.pk]),
                      {"site": "blocks.0.hook_resid_post"}, **HX)  # fmt: skip
    assert frag.status_code == 200 and "<html" not in frag.content.decode()


def test_the_token_view_refuses_what_it_cannot_show(client, job, hub):
    url = reverse("models:extraction_tokens", args=[job.pk])
    bad = client.get(url, {"site": "blocks.9.hook_resid_post"})
    assert bad.status_code == 422 and "no site 'blocks.9.hook_resid_post'" in bad.content.decode()
    missing = client.get(reverse("models:extraction_tokens", args=["x_" + "0" * 32]))
    assert missing.status_code == 404
