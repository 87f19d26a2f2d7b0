"""Hook sites: names, resolution by introspection, capture against an independent reference."""

from __future__ import annotations

import pytest
import torch
import transformers

from models_app.ml.hooks import (
    HookSiteError,
    Site,
    canonical_hook_type,
    capture,
    parse_site_name,
    resolve_sites,
    site_name,
)
from models_app.ml.layers import find_blocks

from .conftest import ARCHES, N_LAYERS, assert_rel_close, hidden_states, reference_branches

ALL_TYPES = ["resid_pre", "residual", "attention", "mlp"]

# Written out by hand from the HF sources, so resolution is checked against something independent.
EXPECTED_PATHS = {
    "gpt2": ("transformer.h.1", "transformer.h.1.attn", "transformer.h.1.mlp"),
    "llama": ("model.layers.1", "model.layers.1.self_attn", "model.layers.1.mlp"),
    "gpt_neox": ("gpt_neox.layers.1", "gpt_neox.layers.1.attention", "gpt_neox.layers.1.mlp"),
    "qwen2": ("model.layers.1", "model.layers.1.self_attn", "model.layers.1.mlp"),
    "phi": ("model.layers.1", "model.layers.1.self_attn", "model.layers.1.mlp"),
}


def _ids(batch: int = 3, length: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(2, 384, (batch, length), generator=torch.Generator().manual_seed(seed))


def _collect(model, sites, ids, **kwargs) -> dict[str, torch.Tensor]:
    got: dict[str, torch.Tensor] = {}
    with capture(model, sites, lambda s, t: got.__setitem__(s.name, t.clone()), **kwargs) as cap:
        cap.forward(ids)
    return got


def test_site_names_follow_transformerlens_and_accept_the_seed_aliases():
    assert site_name(3, "residual") == "blocks.3.hook_resid_post"
    assert site_name(0, "mlp") == "blocks.0.hook_mlp_out"
    assert site_name(2, "attention") == "blocks.2.hook_attn_out"
    assert site_name(1, "hook_resid_pre") == "blocks.1.hook_resid_pre"
    assert parse_site_name("blocks.12.hook_attn_out") == (12, "attn_out")
    assert canonical_hook_type(" Residual ") == "resid_post"


@pytest.mark.parametrize("bad", ["mlp_in", "", "blocks"])
def test_it_rejects_unknown_hook_types(bad):
    with pytest.raises(HookSiteError, match="unknown hook type"):
        canonical_hook_type(bad)


def test_it_rejects_a_malformed_site_name():
    with pytest.raises(HookSiteError, match="not a site name"):
        parse_site_name("layers.1.mlp")


@pytest.mark.parametrize("arch", ARCHES)
def test_it_resolves_sites_to_real_module_paths(tiny, arch):
    model, _ = tiny(arch)
    sites = resolve_sites(model, [1], ["resid_pre", "residual", "attention", "mlp"])
    block, attn, mlp = EXPECTED_PATHS[arch]
    assert [(s.name, s.module_path) for s in sites] == [
        ("blocks.1.hook_resid_pre", block),
        ("blocks.1.hook_resid_post", block),
        ("blocks.1.hook_attn_out", attn),
        ("blocks.1.hook_mlp_out", mlp),
    ]


def test_it_names_the_children_when_a_block_has_no_mlp_module():
    config = transformers.OPTConfig(
        vocab_size=64, num_hidden_layers=1, num_attention_heads=2, hidden_size=16, ffn_dim=32,
        word_embed_proj_dim=16,
    )  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(config)
    assert resolve_sites(model, [0], ["residual"])  # residual needs no branch module
    with pytest.raises(HookSiteError, match=r"MLP module of OPTDecoderLayer.*fc1"):
        resolve_sites(model, [0], ["mlp"])


def test_it_rejects_a_layer_out_of_range(tiny):
    model, _ = tiny("llama")
    with pytest.raises(HookSiteError, match="layer 3 out of range"):
        resolve_sites(model, [0, N_LAYERS], ["residual"])


@pytest.mark.parametrize("quantization", ["FP16", "Q4"])
@pytest.mark.parametrize("arch", ARCHES)
def test_captures_equal_an_independent_reference(tiny, arch, quantization):
    model, _ = tiny(arch, quantization)
    assert model.dtype == torch.float32  # on CPU "FP16" computes in fp32, and so does NF4 (Q4)
    ids = _ids()
    sites = resolve_sites(model, range(N_LAYERS), ALL_TYPES)
    got = _collect(model, sites, ids)
    hs = hidden_states(model, ids)  # HF's own, without our hooks
    for layer in range(N_LAYERS):
        pre, post = got[f"blocks.{layer}.hook_resid_pre"], got[f"blocks.{layer}.hook_resid_post"]
        attn, mlp = got[f"blocks.{layer}.hook_attn_out"], got[f"blocks.{layer}.hook_mlp_out"]
        assert post.shape == (3, 12, 64)  # the whole batch, never element 0 of a bare tensor
        torch.testing.assert_close(pre, hs[layer], rtol=0, atol=0)
        if layer < N_LAYERS - 1:  # hidden_states[-1] is after the final norm
            torch.testing.assert_close(post, hs[layer + 1], rtol=0, atol=0)
        ref_attn, ref_mlp = reference_branches(model, arch, layer, hs[layer])
        assert_rel_close(attn, ref_attn)
        assert_rel_close(mlp, ref_mlp)
        assert_rel_close(post, hs[layer] + ref_attn + ref_mlp)


def test_a_bare_tensor_block_output_is_not_indexed(tiny):
    model, _ = tiny("llama")
    ids = _ids(batch=4)
    _, blocks = find_blocks(model)
    with torch.inference_mode():
        raw = blocks[0](model.model.embed_tokens(ids), position_embeddings=model.model.rotary_emb(
            torch.zeros(1), torch.arange(12)[None]))  # fmt: skip
    assert isinstance(raw, torch.Tensor)  # transformers 5: no tuple to unwrap here
    got = _collect(model, resolve_sites(model, [0], ["residual"]), ids)
    assert got["blocks.0.hook_resid_post"].shape == (4, 12, 64)


def test_the_forward_stops_after_the_deepest_requested_block(tiny):
    model, _ = tiny("llama")
    _, blocks = find_blocks(model)
    calls: list[str] = []
    spies = [
        blocks[1].register_forward_hook(lambda *a: calls.append("block1")),
        blocks[2].register_forward_pre_hook(lambda *a: calls.append("block2")),
        model.model.norm.register_forward_pre_hook(lambda *a: calls.append("norm")),
        model.lm_head.register_forward_pre_hook(lambda *a: calls.append("lm_head")),
    ]
    try:
        got = _collect(model, resolve_sites(model, [0, 1], ["residual"]), _ids())
    finally:
        for spy in spies:
            spy.remove()
    assert calls == ["block1"]
    assert set(got) == {"blocks.0.hook_resid_post", "blocks.1.hook_resid_post"}


def test_without_early_stop_the_whole_model_runs(tiny):
    model, _ = tiny("gpt2")
    calls: list[str] = []
    spy = model.lm_head.register_forward_pre_hook(lambda *a: calls.append("lm_head"))
    try:
        _collect(model, resolve_sites(model, [0], ["mlp"]), _ids(), stop_after_deepest=False)
    finally:
        spy.remove()
    assert calls == ["lm_head"]


def _hook_counts(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_hooks_are_removed_even_when_the_sink_raises(tiny):
    model, _ = tiny("qwen2")
    before = _hook_counts(model)

    def broken_sink(site: Site, t: torch.Tensor) -> None:
        raise RuntimeError("disk full")

    sites = resolve_sites(model, [0, 2], ALL_TYPES)
    with pytest.raises(RuntimeError, match="disk full"), capture(model, sites, broken_sink) as cap:
        assert _hook_counts(model) == before + len(sites) + 1  # + the early-stop hook
        cap.forward(_ids())
    assert _hook_counts(model) == before


def test_the_model_runs_normally_after_an_early_stopped_capture(tiny):
    model, _ = tiny("phi")
    ids = _ids()
    with torch.inference_mode():
        logits_before = model(input_ids=ids).logits
    with capture(model, resolve_sites(model, [0], ["residual"]), lambda s, t: None):
        model(input_ids=ids)  # a plain call: the early stop is swallowed by the context manager
    with torch.inference_mode():
        torch.testing.assert_close(model(input_ids=ids).logits, logits_before, rtol=0, atol=0)
