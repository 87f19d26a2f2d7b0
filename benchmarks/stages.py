"""Where extraction time goes: the pipeline built up stage by stage against the bare forward.

    python -m benchmarks.stages [--device cpu|cuda] [--dtype bfloat16] [--shape 12x768]
                                [--hooks residual|all|every] [--sequences N] [--repeats R]

Each stage adds one part of what `run_extraction` does, on the same model and tokens:

    bare_forward   the HF forward up to the deepest site (the limit)
    hooks          + our forward hooks, calling a sink that does nothing
    copy           + each hooked tensor copied into a pinned host buffer (CUDA: on the side stream)
    copy_stats     + the streaming statistics of every site
    ours_disk      run_extraction end to end (tokenization, writer thread, sha256, fsync), shards
                   on the scratch disk ($TMPDIR)
    ours_memory    the same with the shards on /dev/shm, where the disk costs nothing

The difference between two neighbouring stages is what that part costs. The last line printed is
one JSON object: {stage: tok/s}, each stage's paired ratio to the bare forward, and the setup.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
import transformers

from models_app.ml.hooks import capture, known_shape
from models_app.ml.loading import load_model
from models_app.ml.snapshot import SiteSnapshots
from models_app.ml.storage import StagingPool, copy_on_stream

from .extraction import BenchConfig, bare_forward, machine, ours, paired, parse_shape
from .timing import Method, time_methods, warm_up
from .workload import (
    HOOK_SETS,
    build_model_dir,
    every_layer,
    gpt2_config,
    load_tokenizer,
    make_workload,
    sites_for,
)

SHM = Path("/dev/shm")


def staged(model, sites, device: torch.device, *, copy: bool, stats: bool) -> Method:
    """The forward with our hooks; `copy` stages every hooked tensor in pinned host memory,
    `stats` also updates the sites' statistics (one stacked update). Nothing is written."""
    cuda = device.type == "cuda"
    storage = torch.float32 if not cuda else torch.bfloat16
    stream = torch.cuda.Stream(device) if cuda else None

    def run(work, out_dir: Path) -> int:
        b, t, d = work.batch_size, work.tokens.shape[1], model.config.hidden_size
        shape = {s.name: known_shape(model, s, d) for s in sites}  # one token's: (d,), (H, d_h)
        pool = StagingPool(1, {n: (b, t, *s) for n, s in shape.items()}, storage, cuda).acquire()
        buffers = pool.buffers  # (B, T, *shape) each, views of pool.stacks (S_w, B, T, w)
        snaps, fired = SiteSnapshots([s.name for s in sites], shape, b, t, device), {}

        def sink(site, x):  # x: (b, T, d)
            fired[site.name] = x
            if copy:
                dst = buffers[site.name][: x.shape[0]]
                if cuda:
                    copy_on_stream(stream, dst, x)
                else:
                    dst.copy_(x)

        with capture(model, sites, sink) as cap:  # the timing synchronises every stream
            for ids in work.batches():  # (B, T)
                cap.forward(ids.pin_memory().to(device, non_blocking=True) if cuda else ids)
                if stats and cuda:  # one stacked update per width, as extraction does
                    for s in sites:
                        snaps.take(s.name, fired[s.name])
                    snaps.update_stats(ids.shape[0])
                elif stats:  # CPU: from the staged copies, as extraction does
                    snaps.update_stats_from(pool.stacks, ids.shape[0])
        return work.n_tokens

    return run


def ours_in(folder: Path, model, tokenizer, layers, hooks) -> Method:
    """Our extraction with its shards under `folder` instead of the timing's scratch folder."""
    method = ours(model, tokenizer, layers, hooks)

    def run(work, out_dir: Path) -> int:
        target = folder / f"mistudio-stages-{os.getpid()}"
        shutil.rmtree(target, ignore_errors=True)
        try:
            return method(work, target)
        finally:
            shutil.rmtree(target, ignore_errors=True)

    return run


def stage_methods(model, tokenizer, cfg: BenchConfig, hooks, device) -> dict[str, Method]:
    sites = sites_for(model, cfg.layers, hooks)
    methods = {
        "bare_forward": lambda work, _: bare_forward(model, max(cfg.layers))(work.batches(), _),
        "hooks": staged(model, sites, device, copy=False, stats=False),
        "copy": staged(model, sites, device, copy=True, stats=False),
        "copy_stats": staged(model, sites, device, copy=True, stats=True),
        "ours_disk": ours(model, tokenizer, cfg.layers, hooks),
    }
    if SHM.is_dir():
        methods["ours_memory"] = ours_in(SHM, model, tokenizer, cfg.layers, hooks)
    return methods


def run_stages(cfg: BenchConfig, hooks: str = "residual") -> dict:
    """Time every stage; `hooks` names a HOOK_SETS entry ("every": at every layer)."""
    device = torch.device(cfg.device)
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="mistudio-stages-") as tmp:
        scratch = Path(tmp)
        model_dir = build_model_dir(scratch / "gpt2", gpt2_config(cfg.shape))
        work = make_workload(model_dir, cfg.n_sequences, cfg.context_size, cfg.batch_size)
        model, report = load_model(model_dir, cfg.quantization, device, dtype=cfg.compute_dtype())
        if hooks == "every":
            cfg.layers = every_layer(model)
        methods = stage_methods(model, load_tokenizer(model_dir), cfg, HOOK_SETS[hooks], device)
        methods = warm_up(methods, work, scratch, device, notes)
        timings = time_methods(methods, work, cfg.repeats, scratch, device)
    return {
        "tok_s": {m: round(t["tok_s"], 1) for m, t in timings.items()},
        "vs_bare": {m: paired(timings, m, "bare_forward", "runs_tok_s") for m in timings},
        "hooks": list(HOOK_SETS[hooks]), "layers": cfg.layers, "device": str(device),
        "compute_dtype": report.compute_dtype, "quantization": cfg.quantization,
        "tokens_per_run": work.n_tokens, "batch": [cfg.batch_size, cfg.context_size],
        "shape": cfg.shape, "machine": machine(device), "notes": notes,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.stages", description=__doc__)
    p.add_argument("--device", choices=("cpu", "cuda"), default=None)
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None)
    p.add_argument("--quantization", default="FP16")
    p.add_argument("--shape", default="12x768")
    p.add_argument("--layers", default="3,6,9")
    p.add_argument(
        "--hooks",
        choices=tuple(HOOK_SETS),
        default="residual",
        help="residual, all (+mlp, attention) or every (5 hook types at every layer)",
    )
    p.add_argument("--sequences", type=int, default=None)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    transformers.logging.set_verbosity_error()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg = BenchConfig(
        device=device, quantization=args.quantization.upper(), dtype=args.dtype,
        layers=[int(x) for x in args.layers.split(",")], shape=parse_shape(args.shape),
        repeats=args.repeats,
    )  # fmt: skip
    if device == "cuda":
        cfg.scale_for_cuda()
    cfg.n_sequences = args.sequences or cfg.n_sequences
    result = run_stages(cfg, args.hooks)
    for m, v in result["tok_s"].items():
        print(f"{m:<14}{v:>12.1f} tok/s {result['vs_bare'][m]:>8.3f} × bare")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
