"""Every site, on ten layouts, against plain transformers with its own cloning hooks.

The reference registers torch forward hooks on module paths written out by hand from the HF
sources (no code of ours), clones each tensor at hook time and runs the whole model on the token
ids we wrote. Shards must equal it exactly (FP16, which computes in float32 on CPU; and Q4
against transformers loaded at the same bitsandbytes nf4 quantization), and the manifest
statistics must be those of the reference values.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from models_app.ml.export import export_saelens
from models_app.ml.extract import ExtractionError, ExtractionSpec, run_extraction
from models_app.ml.loading import load_model
from models_app.ml.reader import open_extraction
from models_app.ml.storage import verify

from .conftest import CPU, HIDDEN, assert_rel_close, corpus

# (blocks, attention term, MLP term, attention output projection, final norm, an inner module):
# the terms are the modules whose outputs the block adds to the residual stream.
LLAMA_LIKE = ("model.layers", "self_attn", "mlp", "self_attn.o_proj", "model.norm")
POST_NORMED = ("model.layers", "post_attention_layernorm", "post_feedforward_layernorm",
               "self_attn.o_proj", "model.norm")  # fmt: skip
FALCON = ("transformer.h", "self_attention", "mlp", "self_attention.dense", "transformer.ln_f")
REF = {
    "gpt2": ("transformer.h", "attn", "mlp", "attn.c_proj", "transformer.ln_f", "mlp.c_fc"),
    "llama": (*LLAMA_LIKE, "mlp.down_proj"),
    "mistral": (*LLAMA_LIKE, "mlp.up_proj"),
    "qwen2": (*LLAMA_LIKE, "mlp.down_proj"),
    "phi": ("model.layers", "self_attn", "mlp", "self_attn.dense", "model.final_layernorm",
            "mlp.fc1"),
    "gpt_neox": ("gpt_neox.layers", "attention", "mlp", "attention.dense",
                 "gpt_neox.final_layer_norm", "mlp.dense_4h_to_h"),
    "gemma2": (*POST_NORMED, "mlp.down_proj"),
    "gemma3": (*POST_NORMED, "mlp.up_proj"),
    "olmo2": (*POST_NORMED, "mlp.gate_proj"),
    "falcon": (*FALCON, "mlp.dense_4h_to_h"),
    "falcon_new": (*FALCON, "mlp.dense_h_to_4h"),
}  # fmt: skip
POST_NORM = {"gemma2", "gemma3", "olmo2"}  # attention term = post_attention_layernorm(o_proj(z))
# Falcon's bitsandbytes load leaves FalconLinear unquantized (the loader refuses it), so Q4 runs
# on the others.
Q4_ARCHES = ("llama", "gpt2", "gemma2", "gemma3", "olmo2", "mistral", "qwen2")
TYPES = ["residual", "attention", "mlp", "z", "ln_final"]
LAYERS = (0, 1)
CONTEXT, BATCH = 16, 4


@pytest.fixture(scope="module")
def repos(tiny_repo):
    """arch -> folder of a saved tiny model (the session's, see conftest.tiny_repo)."""
    return tiny_repo


def plain_transformers(path: Path, quantization: str) -> nn.Module:
    """The reference model: transformers alone, at the same quantization as ours."""
    if quantization == "FP16":  # float32 on CPU, like our FP16 option there
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    nf4 = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )  # fmt: skip
    return AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, quantization_config=nf4, device_map="cpu"
    ).eval()


def _tensor(x) -> torch.Tensor:
    return x[0] if isinstance(x, tuple) else x


def reference(model: nn.Module, arch: str, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every site's value for ids (B, T): torch hooks that clone, on hand-written module paths."""
    blocks, attn, mlp, proj, norm, inner = REF[arch]
    heads = model.config.num_attention_heads
    got: dict[str, torch.Tensor] = {}

    def out(name):
        return lambda m, a, o: got.__setitem__(name, _tensor(o).clone())

    def inp(name):
        return lambda m, a: got.__setitem__(name, a[0].clone())

    hooks = []
    for i in LAYERS:
        block = f"{blocks}.{i}"
        sub = lambda p: model.get_submodule(f"{block}.{p}")  # noqa: B023, E731
        hooks += [
            model.get_submodule(block).register_forward_pre_hook(inp(f"blocks.{i}.hook_resid_pre")),
            model.get_submodule(block).register_forward_hook(out(f"blocks.{i}.hook_resid_post")),
            sub(attn).register_forward_hook(out(f"blocks.{i}.hook_attn_out")),
            sub(mlp).register_forward_hook(out(f"blocks.{i}.hook_mlp_out")),
            sub(proj).register_forward_pre_hook(inp(f"blocks.{i}.attn.hook_z")),
        ]
    hooks += [
        model.get_submodule(norm).register_forward_hook(out("ln_final.hook_normalized")),
        model.get_submodule(f"{blocks}.1.{inner}").register_forward_pre_hook(
            inp(f"{blocks}.1.{inner}.hook_input")
        ),
        model.get_submodule(f"{blocks}.1.{inner}").register_forward_hook(
            out(f"{blocks}.1.{inner}.hook_output")
        ),
    ]
    try:
        with torch.no_grad():
            hidden = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
    finally:
        for hook in hooks:
            hook.remove()
    if hidden:  # HF's own collection (none for the test's own layer class)
        torch.testing.assert_close(got["ln_final.hook_normalized"], hidden[-1], rtol=0, atol=0)
    for i in LAYERS:
        z = got[f"blocks.{i}.attn.hook_z"]  # (B, T, H·d_head)
        got[f"blocks.{i}.attn.hook_z"] = z.view(*z.shape[:2], heads, -1)  # (B, T, H, d_head)
    return got


def _spec(arch: str, **overrides) -> ExtractionSpec:
    blocks, *_, inner = REF[arch]
    values = dict(
        layers=list(LAYERS), hook_types=TYPES, context_size=CONTEXT, batch_size=BATCH,
        max_samples=2 * BATCH, shard_sequences=BATCH, include_resid_pre=True,
        module_sites=[{"path": f"{blocks}.1.{inner}", "io": io} for io in ("input", "output")],
    )  # fmt: skip
    return ExtractionSpec(**{**values, **overrides})


def _shards(out: Path, manifest: dict) -> dict[str, list[dict[str, torch.Tensor]]]:
    return {h["name"]: [load_file(out / s["file"]) for s in h["shards"]] for h in manifest["hooks"]}


def assert_statistics_match(stats: dict, values: torch.Tensor) -> None:
    """Manifest statistics == those of the reference values (B, T, …), one token per vector."""
    x = values.double().reshape(-1, values[0, 0].numel())  # (N, width)
    norms = x.norm(dim=-1)
    assert stats["count"] == x.numel() and stats["n_tokens"] == x.shape[0]
    assert stats["min"] == float(x.min()) and stats["max"] == float(x.max())
    norm = stats["norm"]
    pairs = [(stats["mean"], x.mean()), (stats["std"], x.std(correction=0)),
             (norm["mean"], norms.mean()), (norm["max"], norms.max())]  # fmt: skip
    for got, want in pairs:
        assert abs(got - float(want)) <= 1e-9 + 1e-6 * abs(float(want)), (got, float(want))


def check_against_reference(model, ref_model, tok, arch: str, out: Path, spec=None) -> dict:
    manifest = run_extraction(model, tok, corpus(300), spec or _spec(arch), out, meta={})
    assert verify(out) == []
    shards = _shards(out, manifest)
    first = shards[manifest["hooks"][0]["name"]]
    refs = [reference(ref_model, arch, s["token_ids"].long()) for s in first]
    assert set(shards) == set(refs[0])  # every site, nothing else
    for hook in manifest["hooks"]:
        name = hook["name"]
        for shard, ref in zip(shards[name], refs, strict=True):
            torch.testing.assert_close(shard["activations"], ref[name], rtol=0, atol=0)
        assert_statistics_match(hook["statistics"], torch.cat([r[name] for r in refs]))
    return manifest


@pytest.mark.parametrize(
    "arch,quantization", [(a, "FP16") for a in REF] + [(a, "Q4") for a in Q4_ARCHES]
)
def test_every_site_equals_plain_transformers(repos, tmp_path, arch, quantization):
    model, _ = load_model(repos(arch), quantization, CPU)
    tok = AutoTokenizer.from_pretrained(repos(arch))
    manifest = check_against_reference(
        model, plain_transformers(repos(arch), quantization), tok, arch, tmp_path
    )
    assert manifest["self_check"]["passed"]  # attention + mlp add up, post-norm blocks included
    z = next(h for h in manifest["hooks"] if h["name"] == "blocks.1.attn.hook_z")
    heads = model.config.num_attention_heads
    head_dim = HIDDEN // 2 if arch in ("gemma2", "gemma3") else HIDDEN // heads
    assert z["shape"] == [heads, head_dim] and z["d"] == heads * head_dim


@pytest.mark.parametrize("arch", list(REF))
def test_the_branch_terms_and_hook_z_are_what_the_block_computes(repos, arch):
    """On the reference itself: resid_pre + attn_out + mlp_out == resid_post, and the output
    projection applied to hook_z gives hook_attn_out (bias included; post-norm: then its norm)."""
    model = plain_transformers(repos(arch), "FP16")
    blocks, attn_norm, _, proj, *_ = REF[arch]
    ids = torch.randint(2, 384, (3, CONTEXT), generator=torch.Generator().manual_seed(1))
    ref = reference(model, arch, ids)
    for i in LAYERS:
        pre, post = ref[f"blocks.{i}.hook_resid_pre"], ref[f"blocks.{i}.hook_resid_post"]
        attn, mlp = ref[f"blocks.{i}.hook_attn_out"], ref[f"blocks.{i}.hook_mlp_out"]
        assert_rel_close(pre + attn + mlp, post)
        with torch.no_grad():
            projected = model.get_submodule(f"{blocks}.{i}.{proj}")(
                ref[f"blocks.{i}.attn.hook_z"].flatten(-2)
            )
            if arch in POST_NORM:
                projected = model.get_submodule(f"{blocks}.{i}.{attn_norm}")(projected)
        assert_rel_close(projected, attn)


class InPlaceParallelLayer(nn.Module):
    """A Llama layer rewritten as a parallel block that changes hooked tensors after the hooks:
    `mlp += attn` (Falcon's layout) and `hidden_states += mlp` (the block input, which is also
    the previous block's output, changed in place)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.input_layernorm, self.self_attn, self.mlp = (
            layer.input_layernorm, layer.self_attn, layer.mlp
        )  # fmt: skip

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        x = self.input_layernorm(hidden_states)  # (B, T, d)
        attn, _ = self.self_attn(hidden_states=x, **kwargs)  # (B, T, d)
        mlp = self.mlp(x)  # (B, T, d)
        mlp += attn
        hidden_states += mlp
        return hidden_states


def test_tensors_modified_in_place_after_the_hook_are_stored_as_they_were(repos, tmp_path):
    model, _ = load_model(repos("llama"), "FP16", CPU)
    tok = AutoTokenizer.from_pretrained(repos("llama"))
    ref_model = plain_transformers(repos("llama"), "FP16")
    for m in (model, ref_model):
        layers = m.model.layers
        for i in range(len(layers)):
            layers[i] = InPlaceParallelLayer(layers[i])
    REF["inplace"] = ("model.layers", "self_attn", "mlp", "self_attn.o_proj", "model.norm",
                      "mlp.down_proj")  # fmt: skip
    try:
        manifest = check_against_reference(model, ref_model, tok, "inplace", tmp_path)
    finally:
        del REF["inplace"]
    assert manifest["self_check"]["passed"]
    # The block really changes them: a hook that keeps the live tensors sees other values.
    live: dict[str, torch.Tensor] = {}
    ids = torch.randint(2, 384, (2, CONTEXT), generator=torch.Generator().manual_seed(2))
    layer = ref_model.model.layers[1]
    hooks = [
        layer.register_forward_pre_hook(lambda m, a: live.__setitem__("pre", a[0])),
        layer.mlp.register_forward_hook(lambda m, a, o: live.__setitem__("mlp", o)),
    ]
    REF["inplace"] = REF["llama"]
    try:
        cloned = reference(ref_model, "inplace", ids)
    finally:
        del REF["inplace"]
        for hook in hooks:
            hook.remove()
    for name, key in (("blocks.1.hook_mlp_out", "mlp"), ("blocks.1.hook_resid_pre", "pre")):
        assert (cloned[name] - live[key]).abs().max() > 1e-3


def test_hook_z_keeps_its_heads_when_they_are_wider_than_the_stream(repos, tmp_path):
    model, _ = load_model(repos("gemma2"), "FP16", CPU)
    tok = AutoTokenizer.from_pretrained(repos("gemma2"))
    spec = ExtractionSpec(layers=[2], hook_types=["z"], context_size=8, batch_size=2, max_samples=3)
    manifest = run_extraction(model, tok, corpus(50), spec, tmp_path, meta={})
    (hook,) = manifest["hooks"]
    assert hook["name"] == "blocks.2.attn.hook_z" and hook["shape"] == [4, 32] and hook["d"] == 128
    shard = load_file(tmp_path / hook["shards"][0]["file"])["activations"]
    assert shard.shape == (3, 8, 4, 32) and verify(tmp_path) == []


@pytest.mark.parametrize(
    "module_site,message",
    [
        ({"path": "model.layers.1.mlp.down_prj", "io": "output"},
         r"no module 'model.layers.1.mlp.down_prj'.*did you mean model.layers.1.mlp.down_proj"),
        ({"path": "model.layers.9.mlp", "io": "output"}, "no module 'model.layers.9.mlp'"),
        ({"path": "model.embed_tokens", "io": "input"}, "is torch.int64, not activations"),
        ({"path": "model.layers.1.mlp", "io": "inside"}, "read 'input' or 'output'"),
    ],
)  # fmt: skip
def test_a_bad_module_path_is_refused_before_anything_is_written(
    repos, tmp_path, module_site, message
):
    model, _ = load_model(repos("llama"), "FP16", CPU)
    tok = AutoTokenizer.from_pretrained(repos("llama"))
    spec = ExtractionSpec(layers=[], hook_types=[], context_size=8, batch_size=2, max_samples=2,
                          module_sites=[module_site])  # fmt: skip
    with pytest.raises(ExtractionError, match=message):
        run_extraction(model, tok, corpus(50), spec, tmp_path / "out", meta={})
    assert not (tmp_path / "out").exists()


def test_a_module_outside_the_blocks_runs_the_whole_model(repos, tmp_path):
    model, _ = load_model(repos("qwen2"), "FP16", CPU)
    tok = AutoTokenizer.from_pretrained(repos("qwen2"))
    head_site = {"path": "lm_head", "io": "output"}
    spec = ExtractionSpec(layers=[0], hook_types=["residual"], context_size=8, batch_size=2,
                          max_samples=2, module_sites=[head_site])  # fmt: skip
    manifest = run_extraction(model, tok, corpus(50), spec, tmp_path, meta={})
    head = manifest["hooks"][1]
    assert head["name"] == "lm_head.hook_output" and head["shape"] == [384]  # the logits
    ids = load_file(tmp_path / head["shards"][0]["file"])["token_ids"].long()
    with torch.no_grad():
        logits = plain_transformers(repos("qwen2"), "FP16")(input_ids=ids).logits
    got = load_file(tmp_path / head["shards"][0]["file"])["activations"]
    torch.testing.assert_close(got, logits, rtol=0, atol=0)


def test_the_reader_and_the_saelens_export_read_the_new_sites(repos, tmp_path):
    datasets = pytest.importorskip("datasets")
    model, _ = load_model(repos("gemma2"), "FP16", CPU)
    tok = AutoTokenizer.from_pretrained(repos("gemma2"))
    sites = [{"path": "model.layers.1.mlp.up_proj", "io": "output"}]
    spec = ExtractionSpec(layers=[1], hook_types=["z", "ln_final", "mlp"], context_size=8,
                          batch_size=3, max_samples=5, shard_sequences=3,
                          module_sites=sites)  # fmt: skip
    run_extraction(model, tok, corpus(80), spec, tmp_path / "x", meta={})
    ext = open_extraction(tmp_path / "x")
    assert {s.name: s.shape for s in ext.sites} == {
        "blocks.1.hook_mlp_out": (64,), "blocks.1.attn.hook_z": (4, 32),
        "ln_final.hook_normalized": (64,), "model.layers.1.mlp.up_proj.hook_output": (128,),
    }  # fmt: skip
    parts = list(ext.sequences(batch_size=5))  # one batch per shard: 3 + 2 sequences
    batch = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    ref = reference(plain_transformers(repos("gemma2"), "FP16"), "gemma2", batch["token_ids"][:3])
    for name in ("blocks.1.attn.hook_z", "ln_final.hook_normalized", "blocks.1.hook_mlp_out"):
        torch.testing.assert_close(batch[name][:3], ref[name], rtol=0, atol=0)
    out = export_saelens(tmp_path / "x", tmp_path / "sae")
    ds = datasets.load_from_disk(str(out))
    assert ds.features["blocks.1.attn.hook_z"].shape == (8, 128)  # heads flattened, in order
    ds.set_format("torch")
    z = batch["blocks.1.attn.hook_z"].flatten(2)  # (n, T, H·d_head)
    torch.testing.assert_close(ds[:]["blocks.1.attn.hook_z"], z, rtol=0, atol=0)
