"""Extraction benchmark: ours against the bare forward, TransformerLens, nnsight and the seed.

    python -m benchmarks.extraction [--quick] [--device cpu|cuda] [--quantization FP16|…|all]
                                    [--layers 3,6,9]

Builds a GPT-2-small-shaped model (12 × 768, random weights, offline) and one fixed token stream,
then times, in this one process and on the same tokens, each method end to end (capture + the
same safetensors bytes on disk): tokens per second, the median of `repeats` rounds whose method
order rotates. Workloads: residual at `--layers`, residual+mlp+attention there, and every site
(residual, mlp, attention, resid_pre, hook_z at every layer, against the bare forward over every
layer); contenders: TransformerLens, nnsight, SAELens's activation cache runner (one run per
hook), the seed's approach. Peak RSS of our extraction for N and 10×N sequences, for each site
set, comes from fresh subprocesses (`benchmarks.memory`); `manage.py extract`'s time to its first
batch from `benchmarks.cli_start`. The last line printed is one JSON object; the lines before it
are a table.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import transformers

from models_app.ml.device import cpu_model_name
from models_app.ml.extract import POOL_SLOTS, ExtractionSpec, run_extraction
from models_app.ml.layers import find_blocks
from models_app.ml.loading import QUANTIZATIONS, load_model

from . import cli_start, disk, memory, peers
from .timing import Method, time_methods, warm_up
from .workload import (
    ALL_HOOKS,
    EVERY_SITE,
    RESIDUAL,
    Workload,
    build_model_dir,
    every_layer,
    gpt2_config,
    load_tokenizer,
    make_workload,
    sites_for,
)


@dataclass
class BenchConfig:
    """One benchmark run. Sizes in sequences (N) of `context_size` tokens (T)."""

    device: str = "cpu"
    quantization: str = "FP16"  # or "all" (CUDA: every quantization; CPU: FP16 first)
    layers: list[int] = field(default_factory=lambda: [3, 6, 9])
    n_sequences: int = 16  # N, per timed run (short runs, many rounds: see time_methods)
    # N of the every-site runs: 64 × 128 tokens, the workload issue 16 set its target on. Each
    # run ends with the fsync of its last batch (188 MB here); 16 sequences would time that
    # tail more than the steady state (see docs/performance.md)
    every_site_sequences: int = 64
    context_size: int = 128  # T
    batch_size: int = 8  # B
    repeats: int = 9  # timed rounds; medians are reported
    memory_sequences: int = 16  # N of the peak-RSS runs (and 10×N)
    memory_seed_style: bool = True  # also measure the seed's approach's peak RSS, for contrast
    peers: bool = True  # time TransformerLens / nnsight when importable
    model_dir: Path | None = None  # a saved model to use instead of building GPT-2-small
    dtype: str | None = None  # compute dtype; None: the app's (float32 on CPU, float16 on CUDA)
    shape: list[int] = field(default_factory=lambda: [12, 768])  # GPT-2 built: [layers, width]

    def compute_dtype(self) -> torch.dtype | None:
        return getattr(torch, self.dtype) if self.dtype else None

    def sequences_of(self, method: str) -> int:
        """The sequences per timed run of `method`."""
        return self.every_site_sequences if method.endswith("every_site") else self.n_sequences

    def quantizations(self) -> list[str]:
        """The quantizations to time; the first one also runs the peers, seed and memory."""
        return list(QUANTIZATIONS) if self.quantization.lower() == "all" else [self.quantization]

    @classmethod
    def quick(cls, **kw) -> BenchConfig:
        """Under two minutes on 2 CPU cores."""
        return cls(n_sequences=8, every_site_sequences=8, repeats=3, memory_sequences=4,
                   memory_seed_style=False, **kw)  # fmt: skip

    def scale_for_cuda(self) -> BenchConfig:
        """A GPU runs GPT-2-small ~1000× faster than 2 CPU cores: longer runs, bigger batches,
        so that each timed run lasts long enough (N × 32, B = 32, T = 256)."""
        self.n_sequences *= 32
        self.every_site_sequences = self.n_sequences  # 12 GB of shards per run already
        self.memory_sequences *= 8
        self.batch_size, self.context_size = 32, 256
        return self


# ---------------------------------------------------------------------------------------------
# Methods


class _Stop(Exception):  # noqa: N818 - control flow
    pass


def _raise_stop(module, inputs, output):
    raise _Stop


def bare_forward(model, deepest: int) -> Callable[[list[torch.Tensor], Path], int]:
    """The limit: the HF forward up to block `deepest` (one hook stops it), nothing kept, under
    `torch.no_grad()` like our capture."""
    device = next(model.parameters()).device

    @torch.no_grad()
    def run(batches: list[torch.Tensor], out_dir: Path) -> int:
        handle = find_blocks(model)[1][deepest].register_forward_hook(_raise_stop)
        try:
            for ids in batches:  # (B, T)
                with contextlib.suppress(_Stop):
                    model(input_ids=ids.to(device), use_cache=False)
        finally:
            handle.remove()
        return sum(b.numel() for b in batches)

    return run


def ours(model, tokenizer, layers: list[int], hook_types) -> Method:
    """run_extraction from the texts (tokenization included) to shards + manifest on disk."""

    def run(work: Workload, out_dir: Path) -> int:
        spec = ExtractionSpec(
            layers=list(layers),
            hook_types=list(hook_types),
            context_size=work.tokens.shape[1],
            batch_size=work.batch_size,
            max_samples=work.tokens.shape[0],
        )
        manifest = run_extraction(model, tokenizer, work.texts, spec, out_dir, meta={})
        return manifest["n_tokens"]

    return run


def _on_batches(runner) -> Method:
    return lambda work, out_dir: runner(work.batches(), out_dir)


# ---------------------------------------------------------------------------------------------
# Building the methods


def core_methods(model, tokenizer, cfg: BenchConfig) -> dict[str, Method]:
    """Bare forward and ours (residual, all hooks) on one loaded model, and the every-site
    workload: EVERY_SITE at every layer against the bare forward over every layer."""
    layers = every_layer(model)
    return {
        "bare_forward": _on_batches(bare_forward(model, max(cfg.layers))),
        "ours": ours(model, tokenizer, cfg.layers, RESIDUAL),
        "ours_all_hooks": ours(model, tokenizer, cfg.layers, ALL_HOOKS),
        "bare_every_site": _on_batches(bare_forward(model, max(layers))),
        "ours_every_site": ours(model, tokenizer, layers, EVERY_SITE),
    }


def seed_methods(model, cfg: BenchConfig, dtype) -> dict[str, Method]:
    """The seed's approach on the same model (hooks are added and removed on every run)."""
    return {
        "seed_style" + suffix: _on_batches(
            peers.seed_style_runner(model, sites_for(model, cfg.layers, hooks), dtype)
        )
        for suffix, hooks in (("", RESIDUAL), ("_all_hooks", ALL_HOOKS))
    }


def peer_methods(model_dir: Path, cfg: BenchConfig, device, dtype, notes: list[str]) -> dict:
    """TransformerLens, nnsight and SAELens methods, each library on a freshly loaded model of
    its own."""
    out: dict[str, Method] = {}
    for lib, version in peers.available().items():
        if not cfg.peers:
            continue
        if version is None:
            extra = "test" if lib == "sae_lens" else "bench"
            notes.append(f"{lib} is not installed (pip install '.[{extra}]'): its keys are null")
            continue
        try:
            out.update(peer(lib, model_dir, cfg, device, dtype))
        except Exception as exc:  # a peer that cannot run here is reported, not fatal
            notes.append(f"{lib} {version} could not run: {type(exc).__name__}: {exc}"[:400])
    return out


def peer(lib: str, model_dir: Path, cfg: BenchConfig, device, dtype) -> dict[str, Method]:
    """`<lib>` and `<lib>_all_hooks` methods of one peer library (SAELens: `sae_lens_cache…`;
    TransformerLens also `…_every_site`)."""
    model, _ = load_model(model_dir, cfg.quantizations()[0], device, dtype=cfg.compute_dtype())
    workloads = [("", cfg.layers, RESIDUAL), ("_all_hooks", cfg.layers, ALL_HOOKS)]
    if lib == "transformer_lens":
        tl_model = peers.wrap_transformer_lens(model, model_dir)
        make = lambda sites: peers.transformer_lens_runner(tl_model, sites, dtype, device)  # noqa: E731
        workloads.append(("_every_site", every_layer(model), EVERY_SITE))
    elif lib == "sae_lens":  # float32 shards, like ours on CPU
        tl_model = peers.wrap_transformer_lens(model, model_dir)
        make = lambda sites: peers.sae_lens_cache_runner(tl_model, sites, cfg.batch_size, device)  # noqa: E731
        lib = "sae_lens_cache"
    else:
        wrapped = peers.wrap_nnsight(model)
        make = lambda sites: peers.nnsight_runner(wrapped, sites, dtype, device)  # noqa: E731
    return {
        lib + suffix: _on_batches(make(sites_for(model, layers, hooks)))
        for suffix, layers, hooks in workloads
    }


# ---------------------------------------------------------------------------------------------
# The run


RATIOS = {  # key: (numerator, denominator) method names
    "ours_vs_bare": ("ours", "bare_forward"),
    "ours_all_hooks_vs_bare": ("ours_all_hooks", "bare_forward"),
    "ours_vs_transformer_lens": ("ours", "transformer_lens"),
    "ours_vs_nnsight": ("ours", "nnsight"),
    "ours_vs_seed_style": ("ours", "seed_style"),
    "ours_all_hooks_vs_transformer_lens": ("ours_all_hooks", "transformer_lens_all_hooks"),
    "ours_all_hooks_vs_nnsight": ("ours_all_hooks", "nnsight_all_hooks"),
    "ours_all_hooks_vs_seed_style": ("ours_all_hooks", "seed_style_all_hooks"),
    "ours_every_site_vs_bare": ("ours_every_site", "bare_every_site"),
    "ours_every_site_vs_transformer_lens": ("ours_every_site", "transformer_lens_every_site"),
    "ours_vs_sae_lens_cache": ("ours", "sae_lens_cache"),
    "ours_all_hooks_vs_sae_lens_cache": ("ours_all_hooks", "sae_lens_cache_all_hooks"),
}
METHODS = [
    "bare_forward", "ours", "ours_all_hooks", "transformer_lens", "transformer_lens_all_hooks",
    "nnsight", "nnsight_all_hooks", "seed_style", "seed_style_all_hooks", "bare_every_site",
    "ours_every_site", "transformer_lens_every_site", "sae_lens_cache", "sae_lens_cache_all_hooks",
]  # fmt: skip


def bare_for(method: str) -> str:
    """The bare forward a method is compared with: over the same layers."""
    return "bare_every_site" if method.endswith("every_site") else "bare_forward"


def paired(timings: dict, num: str, den: str, runs: str) -> float:
    pairs = zip(timings[num][runs], timings[den][runs], strict=True)
    return round(statistics.median(a / b for a, b in pairs), 3)


def vs_bare(timings: dict, runs: str = "runs_tok_s") -> dict[str, float]:
    """Each method's paired ratio to the bare forward over its layers (see paired_ratios)."""
    return {m: paired(timings, m, bare_for(m), runs) for m in METHODS if bare_for(m) in timings
            and m in timings}  # fmt: skip


def paired_ratios(timings: dict, runs: str = "runs_tok_s") -> dict[str, float | None]:
    """Median over rounds of (numerator tok/s ÷ denominator tok/s) measured in the same round."""
    out = {}
    for key, (num, den) in RATIOS.items():
        out[key] = paired(timings, num, den, runs) if num in timings and den in timings else None
    return out


def time_quantization(q: str, work: Workload, cfg: BenchConfig, device, scratch, notes) -> dict:
    """Load the model at `q` and time bare/ours (+ seed and peers for the first quantization)."""
    model, report = load_model(work.model_dir, q, device, dtype=cfg.compute_dtype())
    tokenizer = load_tokenizer(work.model_dir)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16  # ExtractionSpec's default
    methods = core_methods(model, tokenizer, cfg)
    if q == cfg.quantizations()[0]:
        methods |= seed_methods(model, cfg, dtype)
        methods |= peer_methods(work.model_dir, cfg, device, dtype, notes)
    methods = warm_up(methods, work, scratch, device, notes)
    sizes = {m: cfg.sequences_of(m) for m in methods}
    timings = time_methods(methods, work, cfg.repeats, scratch, device, sizes)
    del methods, model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the next quantization starts from an empty GPU
    return {"timings": timings, "load": asdict(report), "storage_dtype": str(dtype)[6:]}


def measure_memory(work: Workload, cfg: BenchConfig) -> dict:
    """Peak RSS (MiB) of our extraction for N and 10×N sequences.

    Both runs use the same batch size and shards of N sequences, so the small run fills one
    shard and the large one ten: what grows with the dataset, if anything, shows. N fills every
    staging slot (batches ≤ N / (slots + 1)), else "growth" is slots only the large run touched.
    """
    n = cfg.memory_sequences
    batch = min(cfg.batch_size, max(1, n // (max(POOL_SLOTS.values()) + 1)))
    opts = dict(
        layers=cfg.layers, context_size=cfg.context_size, batch_size=batch,
        shard_sequences=n, device=cfg.device, quantization=cfg.quantizations()[0],
    )  # fmt: skip
    out = _growth(memory.peak_rss(work.model_dir, n, **opts), 10 * n, work, opts)
    out["by_hooks"] = {"residual": out["growth"]}
    every = every_layer(transformers.AutoConfig.from_pretrained(work.model_dir))
    for hooks, layers in (("all", cfg.layers), ("every", every)):  # ours, every site set timed
        more = {**opts, "hooks": hooks, "layers": layers}
        grown = _growth(memory.peak_rss(work.model_dir, n, **more), 10 * n, work, more)
        out["by_hooks"][hooks] = grown["growth"]
        out[f"hooks_{hooks}"] = grown
    if cfg.memory_seed_style:
        seed = memory.peak_rss(work.model_dir, n, method="seed_style", **opts)
        out["seed_style"] = _growth(seed, 10 * n, work, {**opts, "method": "seed_style"})
    return out


def _growth(small: dict, n_large: int, work: Workload, opts: dict) -> dict:
    large = memory.peak_rss(work.model_dir, n_large, **opts)
    growth = large["peak_rss_mb"] / small["peak_rss_mb"] - 1
    return {"small": small, "large": large, "growth": round(growth, 4)}


def run_benchmark(cfg: BenchConfig, *, memory_runs: bool = True, cli_runs: bool = True) -> dict:
    """Run everything `cfg` asks for; returns the JSON-ready result (see `summarize`)."""
    device = torch.device(cfg.device)
    notes: list[str] = []
    phases = _Phases()
    with tempfile.TemporaryDirectory(prefix="mistudio-bench-") as tmp:
        scratch = Path(tmp)
        model_dir = cfg.model_dir or build_model_dir(scratch / "gpt2", gpt2_config(cfg.shape))
        n = max(cfg.n_sequences, cfg.every_site_sequences)
        work = make_workload(model_dir, n, cfg.context_size, cfg.batch_size)
        phases.mark("setup")
        by_q = {
            q: time_quantization(q, work, cfg, device, scratch, notes) for q in cfg.quantizations()
        }
        phases.mark("timing")
        # the CLI's start before the memory runs: their gigabytes of shards leave the disk busy
        # writing back and the page cache cold for the next process's imports (+1.7 s seen)
        extra = {"cli_first_batch_s": None, "cli": None}
        if cli_runs:
            extra |= _cli_or_note(scratch, notes)
            phases.mark("cli")
        mem = _memory_or_note(work, cfg, notes) if memory_runs else None
        phases.mark("memory")
        if device.type == "cuda":  # the GPU keys: what the disk takes, next to what we give it
            extra["disk_seq_write_mb_s"] = disk.seq_write_mb_s(scratch)
    return summarize(cfg, by_q, mem, notes) | extra | {"phases_s": phases.seconds}


def _cli_or_note(scratch: Path, notes: list[str]) -> dict:
    """`manage.py extract`'s time to its first batch (see cli_start), median of its runs."""
    try:
        runs = cli_start.measure(scratch / "cli")
    except RuntimeError as exc:
        notes.append(f"CLI first batch not measured: {exc}"[:400])
        return {}
    return {"cli_first_batch_s": runs["first_batch_s"], "cli": runs}


def _memory_or_note(work: Workload, cfg: BenchConfig, notes: list[str]) -> dict | None:
    try:
        return measure_memory(work, cfg)
    except RuntimeError as exc:  # keep the timings already measured
        notes.append(f"peak RSS not measured: {exc}"[:400])
        return None


class _Phases:
    """Wall seconds of each phase of the run, for the record."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(now - self._last, 1)
        self._last = now


# ---------------------------------------------------------------------------------------------
# Report


def machine(device: torch.device) -> dict:
    """What the numbers were measured on."""
    info = {
        "cpu": cpu_model_name() or platform.processor(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        **peers.available(),
        "transformer_lens_api": peers.transformer_lens_api(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _tok_s(timings: dict, name: str) -> float | None:
    return round(timings[name]["tok_s"], 1) if name in timings else None


def summarize(cfg: BenchConfig, by_q: dict, mem: dict | None, notes: list[str]) -> dict:
    """The JSON result: `<method>_tok_s` of the first quantization, paired ratios, peak RSS."""
    first = cfg.quantizations()[0]
    timings = by_q[first]["timings"]
    device = torch.device(cfg.device)
    result = {f"{m}_tok_s": _tok_s(timings, m) for m in METHODS}
    result |= {
        "ratios": paired_ratios(timings),
        "cpu_time_ratios": paired_ratios(timings, "runs_cpu_tok_s"),
        "vs_bare": vs_bare(timings),
        "best_tok_s": {m: round(max(t["runs_tok_s"]), 1) for m, t in timings.items()},
        "runs_tok_s": {m: [round(v, 1) for v in t["runs_tok_s"]] for m, t in timings.items()},
        "sequences": {m: t["sequences"] for m, t in timings.items()},
        "cpu_time_vs_bare": vs_bare(timings, "runs_cpu_tok_s"),
        "peak_rss_mb_small": mem and mem["small"]["peak_rss_mb"],
        "peak_rss_mb_large": mem and mem["large"]["peak_rss_mb"],
        "peak_rss_growth": mem and mem["growth"],
        "peak_rss_growth_by_hooks": mem and mem.get("by_hooks"),
        "device": str(device),
        "quantization": first,
        "backend": by_q[first]["load"]["backend"],
        "compute_dtype": by_q[first]["load"]["compute_dtype"],
        "weights_mb": round(by_q[first]["load"]["footprint_bytes"] / 2**20, 1),
        "storage_dtype": by_q[first]["storage_dtype"],
        "machine": machine(device),
        "config": {k: v for k, v in asdict(cfg).items() if k != "model_dir"},
        "memory": mem,
        "notes": notes,
    }
    if device.type == "cuda":
        result["gpu_peak_mb"] = {m: round(t["gpu_peak_mb"], 1) for m, t in timings.items()}
        result["end_to_end_disk_tok_s"] = result["ours_tok_s"]  # shards on disk, fsync included
    if len(by_q) > 1:
        result["by_quantization"] = {q: _quantization_row(r) for q, r in by_q.items()}
    return result


def _quantization_row(r: dict) -> dict:
    t = r["timings"]
    row = {f"{m}_tok_s": _tok_s(t, m) for m in ("bare_forward", "ours", "ours_all_hooks")}
    row["ours_vs_bare"] = paired_ratios(t)["ours_vs_bare"]
    row["weights_mb"] = round(r["load"]["footprint_bytes"] / 2**20, 1)
    row["backend"] = r["load"]["backend"]
    row["gpu_peak_mb"] = {m: round(x["gpu_peak_mb"], 1) for m, x in t.items()} or None
    return row


def table(result: dict) -> str:
    """A human-readable table: median and best tokens/s, paired ratios to the bare forward."""
    head = f"{'method':<28}{'tok/s':>9}{'best':>9}{'× bare':>9}{'CPU-time × bare':>17}"
    lines = [head]
    for m, ratio in result["vs_bare"].items():
        tok_s, best = result[f"{m}_tok_s"], result["best_tok_s"][m]
        cpu = result["cpu_time_vs_bare"][m]
        lines.append(f"{m:<28}{tok_s:>9.1f}{best:>9.1f}{ratio:>9.3f}{cpu:>17.3f}")
    lines += [f"{k:<40}{v}" for k, v in result["ratios"].items() if v is not None]
    if result["peak_rss_mb_small"] is not None:
        lines.append(
            f"peak RSS MiB: {result['peak_rss_mb_small']} (N) → {result['peak_rss_mb_large']} "
            f"(10×N), growth {result['peak_rss_growth']:.1%}"
        )
        for hooks, growth in (result["peak_rss_growth_by_hooks"] or {}).items():
            lines.append(f"peak RSS growth for 10×N, {hooks} sites: {growth:.1%}")
    seed = (result["memory"] or {}).get("seed_style")
    if seed:
        lines.append(
            f"peak RSS MiB, seed's approach: {seed['small']['peak_rss_mb']} → "
            f"{seed['large']['peak_rss_mb']}, growth {seed['growth']:.1%}"
        )
    lines += [f"note: {n}" for n in result["notes"]]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Command line


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.extraction", description=__doc__)
    p.add_argument("--quick", action="store_true", help="small sizes: under 2 minutes on 2 cores")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if any")
    p.add_argument("--quantization", default="FP16", help="FP16, Q8, Q4, Q2 or all")
    p.add_argument("--layers", default="3,6,9", help="block indices, comma separated")
    p.add_argument(
        "--dtype",
        choices=("float32", "float16", "bfloat16"),
        default=None,
        help="compute dtype (default: the app's: float32 on CPU, float16 on CUDA)",
    )
    p.add_argument("--shape", default="12x768", help="LAYERSxWIDTH of the GPT-2 model built")
    p.add_argument("--sequences", type=int, help="N sequences per timed run")
    p.add_argument("--every-site-sequences", type=int, help="N of the every-site runs")
    p.add_argument("--repeats", type=int, help="timed rounds (the median is reported)")
    p.add_argument("--no-peers", action="store_true", help="skip TransformerLens and nnsight")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-RSS subprocesses")
    p.add_argument("--no-cli", action="store_true", help="skip timing manage.py extract's start")
    return p


def config_from_args(args) -> BenchConfig:
    """The BenchConfig of the command-line arguments (CUDA: scaled up, see scale_for_cuda)."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    q = args.quantization if args.quantization.lower() == "all" else args.quantization.upper()
    kw = dict(
        device=device, quantization=q, layers=[int(x) for x in args.layers.split(",")],
        peers=not args.no_peers, dtype=args.dtype, shape=parse_shape(args.shape),
    )  # fmt: skip
    cfg = BenchConfig.quick(**kw) if args.quick else BenchConfig(**kw)
    if device == "cuda":
        cfg.scale_for_cuda()
    cfg.n_sequences = args.sequences or cfg.n_sequences
    cfg.every_site_sequences = args.every_site_sequences or cfg.every_site_sequences
    cfg.repeats = args.repeats or cfg.repeats
    return cfg


def parse_shape(value: str) -> list[int]:
    """'12x768' -> [12, 768]."""
    layers, _, width = value.lower().partition("x")
    return [int(layers), int(width)]


def main(argv: list[str] | None = None) -> dict:
    args = _parser().parse_args(argv)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    os.environ.setdefault("TQDM_DISABLE", "1")  # SAELens' and datasets' bars, in every run
    result = run_benchmark(
        config_from_args(args), memory_runs=not args.no_memory, cli_runs=not args.no_cli
    )
    print(table(result))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
