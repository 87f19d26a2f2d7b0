"""The methods ours is compared with, each capturing the same sites and writing the same bytes.

Every runner takes (B, T) token batches and an output folder, runs under `torch.no_grad()` like
our capture (optimum-quanto's int2 weights fail under inference_mode), captures the sites,
converts them to the storage dtype on the CPU, writes one safetensors shard per site with
`write_site_shards` and returns the number of tokens it processed. None of them computes
statistics, hashes or fsyncs — work ours does on top — so the comparison leans in their favour.

- TransformerLens: `run_with_cache(names_filter=…, stop_at_layer=…)` on a HookedTransformer
  (2.x/3.x) or on the TransformerBridge (4.x), built offline from the benchmark's model;
- nnsight: `NNsight(model).trace(input_ids=…)` with `.output.save()` per site and `tracer.stop()`
  after the deepest one;
- SAELens: its activation cache runner (`CacheActivationsRunner`, what SAE training reads with
  `use_cached_activations`), on a HookedTransformer around the same weights, fed the same token
  ids as a pre-tokenized dataset; it caches one hook per run, so a workload of S sites is S runs
  (S forwards), timed together; its Arrow shards are its own format, written by `datasets`;
- the seed's approach (architecture.md §8): forward hooks calling `.detach().cpu()`
  synchronously, the full model forward (lm_head included), everything kept in memory until the
  end.

Peer libraries are optional (`pip install '.[bench]'`; sae-lens comes with '.[test]'):
`available()` says which are importable.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import torch
from torch import nn

from models_app.ml.hooks import Site

from .workload import load_tokenizer, write_site_shards

Runner = Callable[[list[torch.Tensor], Path], int]
# Execution order of the sites inside one block, for nnsight (which must be read in that order).
_BLOCK_ORDER = {"attn_out": 0, "mlp_out": 1, "resid_post": 2}


def available() -> dict[str, str | None]:
    """{'transformer_lens': version or None, 'nnsight': version or None, 'sae_lens': …}: None
    when the library cannot be imported here."""
    return {name: _version(name) for name in ("transformer_lens", "nnsight", "sae_lens")}


def _version(module: str) -> str | None:
    try:
        importlib.import_module(module)
    except ImportError:
        return None
    return importlib.metadata.version(module.replace("_", "-"))


class _Collector:
    """Captured (b, T, d) tensors of each site, kept on the CPU in the storage dtype until the end.

    Both peers and the seed hold everything in memory before writing; fine at benchmark sizes.
    """

    def __init__(self, sites: list[Site], dtype: torch.dtype):
        self.dtype = dtype
        self.acts: dict[str, list[torch.Tensor]] = {s.name: [] for s in sites}
        self.tokens: list[torch.Tensor] = []

    def add(self, name: str, t: torch.Tensor) -> None:
        self.acts[name].append(t.detach().to("cpu", self.dtype))  # (b, T, d)

    def write(self, out_dir: Path) -> int:
        """Write one shard per site; returns the tokens written."""
        ids = torch.cat(self.tokens)  # (N, T)
        acts = {n: torch.cat(parts).to(self.dtype) for n, parts in self.acts.items()}  # (N, T, d)
        write_site_shards(out_dir, acts, ids)
        return ids.numel()


# ---------------------------------------------------------------------------------------------
# TransformerLens


def wrap_transformer_lens(model: nn.Module, model_dir: Path):
    """The TransformerLens model to time, built offline around `model` (give it a model of its
    own): a HookedTransformer with TransformerLens 2.x/3.x, the TransformerBridge with 4.x (which
    removed HookedTransformer). Both have run_with_cache(names_filter=…, stop_at_layer=…)."""
    if transformer_lens_api() == "HookedTransformer":
        return _hooked_transformer(model, model_dir)
    return _bridge(model, model_dir)


def transformer_lens_api() -> str | None:
    """Which TransformerLens API `wrap_transformer_lens` uses here (None: not installed)."""
    try:
        from transformer_lens import HookedTransformer  # noqa: F401
    except ImportError:
        return "TransformerBridge" if available()["transformer_lens"] else None
    return "HookedTransformer"


def _bridge(model: nn.Module, model_dir: Path):
    """TransformerLens 4.x: the bridge switches `model` to eager attention."""
    from transformer_lens.model_bridge import TransformerBridge

    device = next(model.parameters()).device
    return TransformerBridge.boot_transformers(
        str(model_dir), hf_model=model, tokenizer=load_tokenizer(model_dir), device=device
    )


def _hooked_transformer(model: nn.Module, model_dir: Path):
    """TransformerLens 2.x/3.x, GPT-2 only, offline: `from_pretrained("gpt2", hf_model=…)` would
    fetch the config from the Hub, so the config is written from the HF one and the weights are
    converted with `convert_gpt2_weights`, unprocessed (no LayerNorm folding or centring), so the
    activations are the HF model's."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions.gpt2 import convert_gpt2_weights

    c = model.config
    if c.model_type != "gpt2":
        raise ValueError(f"the HookedTransformer runner builds GPT-2 only, not {c.model_type}")
    param = next(model.parameters())
    cfg = HookedTransformerConfig(
        n_layers=c.n_layer, d_model=c.n_embd, d_head=c.n_embd // c.n_head, n_heads=c.n_head,
        d_mlp=c.n_inner or 4 * c.n_embd, d_vocab=c.vocab_size, n_ctx=c.n_positions,
        act_fn="gelu_new", normalization_type="LN", eps=c.layer_norm_epsilon,
        original_architecture="GPT2LMHeadModel", default_prepend_bos=False,
        device=str(param.device), dtype=param.dtype,
    )  # fmt: skip
    hooked = HookedTransformer(cfg, tokenizer=load_tokenizer(model_dir), move_to_device=False)
    hooked.load_and_process_state_dict(
        convert_gpt2_weights(model, cfg), fold_ln=False, center_writing_weights=False,
        center_unembed=False, fold_value_biases=False, refactor_factored_attn_matrices=False,
    )  # fmt: skip
    return hooked.to(param.device).eval()


def transformer_lens_runner(tl_model, sites: list[Site], dtype: torch.dtype, device) -> Runner:
    """run_with_cache with a names_filter of exactly our site names, stopping after the deepest
    layer."""
    names = [s.name for s in sites]
    stop = max(s.layer for s in sites) + 1

    @torch.no_grad()
    def run(batches: list[torch.Tensor], out_dir: Path) -> int:
        out = _Collector(sites, dtype)
        for ids in batches:  # (B, T)
            _, cache = tl_model.run_with_cache(
                ids.to(device), names_filter=names, stop_at_layer=stop, return_cache_object=False
            )
            for name in names:
                out.add(name, cache[name])
            out.tokens.append(ids)
        return out.write(out_dir)

    return run


# ---------------------------------------------------------------------------------------------
# nnsight


def wrap_nnsight(model: nn.Module):
    """`NNsight(model)`: the generic wrapper, fed token ids (no tokenization inside)."""
    from nnsight import NNsight

    return NNsight(model)


def nnsight_runner(wrapped, sites: list[Site], dtype: torch.dtype, device) -> Runner:
    """NNsight tracing: `.output.save()` on each site's module, then `tracer.stop()`."""
    ordered = sorted(sites, key=lambda s: (s.layer, _BLOCK_ORDER[s.hook_type]))

    @torch.no_grad()
    def run(batches: list[torch.Tensor], out_dir: Path) -> int:
        out = _Collector(sites, dtype)
        for ids in batches:  # (B, T)
            saved = _nnsight_trace(wrapped, ids.to(device), ordered)
            for name, t in saved.items():
                out.add(name, t)
            out.tokens.append(ids)
        return out.write(out_dir)

    return run


def _nnsight_trace(wrapped, ids: torch.Tensor, sites: list[Site]) -> dict[str, torch.Tensor]:
    saved = {}
    with wrapped.trace(input_ids=ids, use_cache=False) as tracer:
        for site in sites:  # module outputs: the block, its attention or its MLP
            value = wrapped.get(site.module_path).output
            saved[site.name] = (value[0] if isinstance(value, tuple) else value).save()
        tracer.stop()
    return saved


# ---------------------------------------------------------------------------------------------
# SAELens


def sae_lens_cache_runner(tl_model, sites: list[Site], batch_size: int, device) -> Runner:
    """SAELens's CacheActivationsRunner once per site, float32, unshuffled, into
    `out_dir/<site>/` (Arrow, its own format). Its model loader is pointed at `tl_model` (a
    HookedTransformer of the same weights, see wrap_transformer_lens): the runner would
    otherwise download the model by name; everything else is SAELens's own code path."""
    from datasets import Dataset
    from sae_lens import CacheActivationsRunner, CacheActivationsRunnerConfig
    from sae_lens import cache_activations_runner as runner_module

    @torch.no_grad()
    def run(batches: list[torch.Tensor], out_dir: Path) -> int:
        tokens = torch.cat(batches)  # (N, T)
        n, t = tokens.shape
        b = min(batch_size, n)  # SAELens needs a whole batch in its buffer
        dataset = Dataset.from_dict({"input_ids": tokens.tolist()})
        for site in sites:
            c = tl_model.cfg
            width = c.d_head * c.n_heads if site.heads else c.d_model  # hook_z: flattened
            cfg = CacheActivationsRunnerConfig(
                dataset_path="mistudio-benchmark", model_name="mistudio-benchmark",
                model_batch_size=b, hook_name=site.name, d_in=width,
                training_tokens=n * t, context_size=t, shuffle=False, dtype="float32",
                device=str(device), prepend_bos=False, streaming=False,
                new_cached_activations_path=str(out_dir / site.name),
                buffer_size_gb=(n + b / 2) * t * width * 4 / 1e9,  # one buffer: every sequence
            )  # fmt: skip
            with mock.patch.object(runner_module, "load_model", return_value=tl_model):
                runner = CacheActivationsRunner(cfg, override_dataset=dataset)
            runner.run()
        return n * t

    return run


# ---------------------------------------------------------------------------------------------
# The seed's approach


def seed_style_runner(model: nn.Module, sites: list[Site], dtype: torch.dtype) -> Runner:
    """Forward hooks with a synchronous `.detach().cpu()`, the whole model run (lm_head
    included, as the seed's `extract_from_batch` did), all activations kept until the end."""
    device = next(model.parameters()).device

    @torch.no_grad()
    def run(batches: list[torch.Tensor], out_dir: Path) -> int:
        out = _Collector(sites, dtype)
        handles = [_seed_hook(model, site, out) for site in sites]
        try:
            for ids in batches:  # (B, T)
                mask = torch.ones_like(ids)
                model(input_ids=ids.to(device), attention_mask=mask.to(device))
                out.tokens.append(ids)
        finally:
            for handle in handles:
                handle.remove()
        return out.write(out_dir)

    return run


def _seed_hook(model: nn.Module, site: Site, out: _Collector):
    def hook(module, inputs, output):
        t = output[0] if isinstance(output, tuple) else output
        out.acts[site.name].append(t.detach().cpu())  # the seed's synchronous copy

    return model.get_submodule(site.module_path).register_forward_hook(hook)
