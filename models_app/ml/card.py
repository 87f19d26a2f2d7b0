"""The dataset card (README.md) of an extraction pushed to the Hub, generated from its manifest.

    text = dataset_card(manifest, repo_id="me/gpt2-acts", endpoint="https://huggingface.co")

A YAML header (licence, tags, task category, size category, pretty name) the Hub reads, then
what a reader needs to trust and reuse the activations: the model (repo, revision and commit,
quantization, compute and stored dtype), the dataset and the sha256 of the texts read, every site
with its shape, the token count, context size and special-token policy, a statistics table per
site, the library versions, and a snippet that reads the shards with miStudio's reader. Only
the manifest is read: the card says nothing the manifest does not.
"""

from __future__ import annotations

import json
import math

TAGS = ("activations", "mechanistic-interpretability", "sparse-autoencoder", "safetensors",
        "mistudio")  # fmt: skip
SIZE_CATEGORIES = ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
                   (1_000_000, "100K<n<1M"), (10_000_000, "1M<n<10M"),
                   (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B"))  # fmt: skip


def dataset_card(manifest: dict, *, repo_id: str, endpoint: str = "https://huggingface.co") -> str:
    """README.md text (YAML header + Markdown) for an extraction pushed as dataset `repo_id`.

    `manifest` is the extraction's manifest.json as a dict; missing keys print as "—".
    `endpoint` is the Hub the card's links point at (the one pushed to)."""
    sections = [
        _header(manifest),
        _title(manifest, repo_id),
        _source(manifest, endpoint),
        _extraction(manifest),
        _sites(manifest),
        _statistics(manifest),
        _files(manifest),
        _reading(repo_id, manifest),
        _libraries(manifest),
    ]
    return "\n".join(sections)


def size_category(n_tokens: int) -> str:
    """The Hub's size category for a dataset of `n_tokens` rows (one token = one row)."""
    for bound, name in SIZE_CATEGORIES:
        if n_tokens < bound:
            return name
    return "n>1B"


def _header(m: dict) -> str:
    model = m.get("model") or {}
    tags = [*TAGS, *([model["architecture"]] if model.get("architecture") else [])]
    lines = [
        "---",
        "license: other",
        "license_name: same-as-model",
        f"pretty_name: {_q(_pretty_name(m))}",
        "task_categories:",
        "- feature-extraction",
        "size_categories:",
        f"- {_q(size_category(int(m.get('n_tokens') or 0)))}",
        "tags:",
        *[f"- {_q(t)}" for t in tags],
        "---",
    ]
    return "\n".join(lines) + "\n"


def _pretty_name(m: dict) -> str:
    model, dataset = m.get("model") or {}, m.get("dataset") or {}
    repo = model.get("repo") or "a model"
    quantization = model.get("quantization") or "?"
    return f"Activations of {repo} ({quantization}) on {dataset.get('name') or 'a dataset'}"


def _title(m: dict, repo_id: str) -> str:
    model = m.get("model") or {}
    meta = m.get("meta") or {}
    return (
        f"# {_pretty_name(m)}\n\n"
        f"Activations of `{model.get('repo')}` read at {len(m.get('hooks') or [])} site(s) over"
        f" {_n(m.get('n_tokens'))} tokens, pushed by miStudio as `{repo_id}`"
        f" from extraction `{meta.get('extraction_id') or '—'}` (created {m.get('created_at')})."
        " The licence is the model's and the dataset's: check both before reuse.\n"
    )


def _source(m: dict, endpoint: str) -> str:
    model, tok, ds = m.get("model") or {}, m.get("tokenizer") or {}, m.get("dataset") or {}
    meta = m.get("meta") or {}
    origin = (
        f"Hub dataset `{ds.get('hf_dataset_id')}` split `{ds.get('split')}` at `{ds.get('commit')}`"
        if ds.get("source") == "hub"
        else f"uploaded file `{ds.get('file')}`"
    )
    rows = [
        ("model", f"[{model.get('repo')}]({endpoint.rstrip('/')}/{model.get('repo')})"),
        ("revision", f"`{model.get('revision')}` (commit `{model.get('commit')}`)"),
        ("quantization", f"{model.get('quantization')} ({meta.get('backend') or 'none'})"),
        ("compute dtype", model.get("dtype")),
        (
            "architecture",
            f"{model.get('architecture')}, {model.get('num_layers')} layers,"
            f" hidden size {model.get('hidden_size')}",
        ),  # fmt: skip
        (
            "tokenizer",
            f"{tok.get('class')} of `{tok.get('name')}`, vocabulary {tok.get('vocab_size')}",
        ),  # fmt: skip
        (
            "dataset",
            f"{ds.get('name')}: {origin},"
            + (f" text field `{ds['text_field']}`," if ds.get("text_field") else "")
            + f" {_n(ds.get('rows'))} rows",
        ),  # fmt: skip
        ("dataset sha256", f"`{ds.get('texts_sha256')}` (the normalized texts read)"),
    ]
    return "## Source\n\n" + _table(("", ""), rows)


def _extraction(m: dict) -> str:
    batch = m.get("batch_size") or {}
    bos = m.get("bos_policy")
    rows = [
        ("tokens", _n(m.get("n_tokens"))),
        ("sequences × context size", f"{_n(m.get('n_sequences'))} × {m.get('context_size')}"),
        ("special tokens", _special(m.get("special_tokens"))),
        ("BOS policy", json.dumps(bos) if isinstance(bos, dict | list) else bos),
        ("document separator", m.get("document_separator")),
        ("batch size (requested / used)", f"{batch.get('requested')} / {batch.get('used')}"),
        ("sequences per shard", m.get("shard_sequences")),
        ("device", (m.get("environment") or {}).get("device")),
        ("self-check", _self_check(m.get("self_check"))),
    ]
    return "## Extraction\n\n" + _table(("", ""), rows)


def _special(policy: str | None) -> str:
    if policy == "parse":
        return "`parse`: special-token strings in the texts became special tokens"
    if policy == "text":
        return "`text`: special-token strings in the texts stayed plain text"
    return str(policy)


def _self_check(check) -> str:
    if not check:
        return "—"
    return json.dumps(check, sort_keys=True)[:300]


def _sites(m: dict) -> str:
    rows = []
    for h in m.get("hooks") or []:
        shards = h.get("shards") or []
        rows.append(
            (
                f"`{h.get('name')}`",
                h.get("layer"),
                f"{h.get('reads')} of `{h.get('module_path')}`",
                "[" + ", ".join(str(d) for d in h.get("shape") or [h.get("d")]) + "]",
                h.get("dtype"),
                len(shards),
                _bytes(sum(int(s.get("bytes") or 0) for s in shards)),
            )
        )
    head = ("site", "layer", "reads", "shape per token", "dtype", "shards", "size")
    return "## Sites\n\n" + _table(head, rows)


def _statistics(m: dict) -> str:
    rows = []
    for h in m.get("hooks") or []:
        s = h.get("statistics") or {}
        norm = s.get("norm") or {}
        rows.append(
            (f"`{h.get('name')}`", _f(s.get("mean")), _f(s.get("std")), _f(s.get("min")),
             _f(s.get("max")), _f(norm.get("mean")), _f(norm.get("p50")), _f(norm.get("p99")),
             _f(norm.get("max")), _pct(s.get("frac_near_zero")), s.get("nonfinite"))
        )  # fmt: skip
    head = ("site", "mean", "std", "min", "max", "‖x‖ mean", "‖x‖ p50", "‖x‖ p99", "‖x‖ max",
            "≈0", "inf/NaN")  # fmt: skip
    return (
        "## Statistics\n\nOver every element (mean, std, min, max) and every token's vector"
        " (L2 norm ‖x‖) of each site, as measured during the extraction.\n\n" + _table(head, rows)
    )


def _files(m: dict) -> str:
    ctx = m.get("context_size")
    return (
        "## Files\n\n"
        "- `manifest.json`: everything above, plus each shard's sequence count, size and sha256,"
        " and a histogram per site.\n"
        "- `shards/<site>/<k:06d>.safetensors`: `activations` `[n_seq,"
        f" {ctx}, *shape]` in the site's dtype, and `token_ids` `[n_seq, {ctx}]` int32.\n"
    )


def _reading(repo_id: str, m: dict) -> str:
    site = ((m.get("hooks") or [{}])[0]).get("name") or "blocks.0.hook_resid_post"
    return f"""## Reading it

With miStudio's reader (`models_app/ml/reader.py`: torch and safetensors only, shards
memory-mapped one at a time; `verify=True` checks every shard's sha256):

```python
from huggingface_hub import snapshot_download
from models_app.ml.reader import open_extraction

ext = open_extraction(snapshot_download({_q(repo_id)}, repo_type="dataset"))
for batch in ext.tokens({_q(site)}, batch_size=4096, shuffle=True, verify=True):
    x = batch[{_q(site)}]  # [n, d]; batch["token_ids"]: [n]
```

Or with safetensors alone: `safetensors.torch.load_file(path)["activations"]`.
"""


def _libraries(m: dict) -> str:
    libs = ((m.get("environment") or {}).get("python_libraries")) or {}
    rows = [(name, version or "not installed") for name, version in sorted(libs.items())]
    return "## Library versions\n\n" + _table(("library", "version"), rows)


def _table(head: tuple, rows: list[tuple]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _cell(value) -> str:
    text = "—" if value is None else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _q(text: str) -> str:
    """A YAML (and Python) string literal: JSON's double-quoted form is both."""
    return json.dumps(text, ensure_ascii=False)


def _f(value) -> str:
    if not isinstance(value, int | float) or not math.isfinite(value):
        return "—"
    return f"{value:.4g}"


def _pct(value) -> str:
    return f"{100 * value:.1f}%" if isinstance(value, int | float) else "—"


def _n(value) -> str:
    return f"{value:,}" if isinstance(value, int) else "—"


def _bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"
