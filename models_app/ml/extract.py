"""Activation extraction: validate a spec, self-check branch sites, stream batches to shards.

    texts ─ pack_documents ─> (B, T) int64 ─ forward up to the deepest layer ─ hooks copy (B, T, d)
          into a staging slot ─ writer thread ─> appended to shard k of each hook (sha256 as it
          goes) ─> shards/…/k.safetensors, and manifest.json last
On CUDA the token batches are made ahead on a thread in pinned memory, the device->host copies run
on a side stream, and one stacked statistics update covers every site, so the thread that launches
the forward's kernels does little else.

With attention/MLP sites, the self-check (resid_post − resid_pre ≈ attn_out + mlp_out) rides on the
first batch's forward and is scored before anything reaches the writer. Progress is reported in
tokens through `on_progress(done, total)`; cancellation is polled between batches through
`should_cancel()`. Nothing here knows about Django.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from itertools import chain
from pathlib import Path

import torch
from torch import nn

from .configs import num_layers, text_config
from .environment import library_versions
from .errors import ExtractionCancelled, ExtractionError
from .hooks import (
    BRANCH_HOOK_TYPES,
    HOOK_TYPES,
    LAYER_HOOK_TYPES,
    SUM_HOOK_TYPES,
    HookSiteError,
    Site,
    canonical_hook_type,
    capture,
    known_shape,
    probe_shapes,
    resolve_module_site,
    resolve_sites,
)
from .snapshot import SiteSnapshots
from .stats import SiteStats
from .storage import (
    MANIFEST_NAME,
    SCHEMA_VERSION,
    STORAGE_DTYPES,
    NonFiniteError,
    ShardWriter,
    Slot,
    StagingPool,
    copy_on_stream,
    dtype_name,
    remove_partial,
    shard_sequences_for,
    storage_dtype,
    write_manifest,
)
from .sumcheck import SumCheck, compute_dtype, refuse_branch_sites, self_check
from .tokens import (
    DEFAULT_SPECIAL_TOKENS,
    SPECIAL_TOKENS,
    Document,
    batched,
    bos_policy,
    pack_documents,
    prefetch,
    token_budget,
)

__all__ = ["ExtractionCancelled", "ExtractionError", "ExtractionSpec", "run_extraction",
           "self_check"]  # fmt: skip

SELF_CHECK_SEQUENCES = 2  # sequences of the first batch the sum check runs on
# Staged batches in flight. CUDA: one filled, two queued (the forward outruns the disk). CPU: one:
# the forward waits while the writer uses every core; beside it, the writer would preempt the
# forward's OpenMP threads (every site, 2 cores: 0.78 → 0.81× the bare forward).
POOL_SLOTS = {"cuda": 3, "cpu": 1}


@dataclass
class ExtractionSpec:
    """What to extract. Sizes are counts of sequences or tokens."""

    layers: list[int]  # block indices, 0-based
    # residual/mlp/attention, or resid_pre/resid_post/attn_out/mlp_out/z (per layer), ln_final
    hook_types: list[str]
    context_size: int  # tokens per sequence (T)
    batch_size: int  # sequences per forward (B)
    max_samples: int  # sequences to extract at most
    shard_sequences: int | None = None  # sequences per shard; None: from shard_bytes
    shard_bytes: int | None = None  # bytes per shard and hook; None: storage.DEFAULT_SHARD_BYTES
    dtype: str | None = None  # storage dtype float32|bfloat16; None: see storage.storage_dtype
    include_resid_pre: bool = False  # also store blocks.{i}.hook_resid_pre
    # Special-token strings in the texts: "text" (plain characters) or "parse" (see tokens.py)
    special_tokens: str = DEFAULT_SPECIAL_TOKENS
    # any module's input or output: [{"path": "model.layers.3.mlp.down_proj", "io": "output"}]
    module_sites: list[dict] = field(default_factory=list)

    def validate(self, model: nn.Module) -> None:
        """Raise ExtractionError with a readable message when the spec cannot run on `model`."""
        for name in ("context_size", "batch_size", "max_samples"):
            if int(getattr(self, name)) < 1:
                raise ExtractionError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("shard_sequences", "shard_bytes"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ExtractionError(f"{name} must be at least 1, got {value}")
        per_layer = set(self.canonical_hook_types()) & set(LAYER_HOOK_TYPES)
        if (per_layer and not self.layers) or not (self.hook_types or self.module_sites):
            raise ExtractionError("choose at least one layer and one hook type")
        limit = max_positions(model.config)
        if limit is not None and self.context_size > limit:
            raise ExtractionError(f"context_size {self.context_size} exceeds the model's {limit}")
        if self.special_tokens not in SPECIAL_TOKENS:
            raise ExtractionError(
                f"special_tokens must be one of {', '.join(SPECIAL_TOKENS)}, "
                f"not {self.special_tokens!r}"
            )
        if self.dtype is not None and self.dtype not in STORAGE_DTYPES:
            raise ExtractionError(
                f"dtype must be one of {sorted(STORAGE_DTYPES)}, not {self.dtype}"
            )
        self.sites(model)

    def canonical_hook_types(self) -> list[str]:
        """Requested hook types in canonical form (plus resid_pre when asked), HOOK_TYPES order."""
        try:
            types = {canonical_hook_type(t) for t in self.hook_types}
        except HookSiteError as exc:
            raise ExtractionError(str(exc)) from exc
        if self.include_resid_pre:
            types.add("resid_pre")
        return sorted(types, key=HOOK_TYPES.index)

    def sites(self, model: nn.Module) -> list[Site]:
        """The sites this spec captures on `model`: the named sites, then the module paths
        (each once). ExtractionError when one does not exist."""
        try:
            sites = resolve_sites(model, self.layers, self.canonical_hook_types())
            for entry in self.module_sites:
                sites.append(resolve_module_site(model, entry["path"], entry.get("io", "output")))
        except HookSiteError as exc:
            raise ExtractionError(str(exc)) from exc
        return list({site.name: site for site in sites}.values())

    def storage_dtype(self, device: torch.device) -> torch.dtype:
        return storage_dtype(device, self.dtype)


def max_positions(config) -> int | None:
    """The longest sequence the model accepts, from its (text) config (None when it does not
    say)."""
    config = text_config(config)
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def hidden_size(config) -> int:
    """Width d of the residual stream (of the text decoder in a multimodal model)."""
    config = text_config(config)
    for name in ("hidden_size", "n_embd", "d_model"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    raise ExtractionError(f"cannot find the hidden size in {type(config).__name__}")


def model_device(model: nn.Module) -> torch.device:
    """Device of the input embeddings: where input ids must go."""
    return model.get_input_embeddings().weight.device


# ---------------------------------------------------------------------------------------------
# The batch loop


@dataclass
class _Plan:
    sites: list[Site]
    device: torch.device
    dtype: torch.dtype  # storage dtype
    d: int
    shapes: dict[str, tuple[int, ...]]  # site name -> shape of one token's tensor
    context_size: int
    batch_size: int
    shard_sequences: int
    batch_size_used: int  # batch_size, halved on each GPU out-of-memory
    notes: list[str] = field(default_factory=list)


class _Run:
    """State of one extraction: staging pool, writer thread, statistics, the hook sink.

    With `check_layers`, the self-check rides on the first batch: its forward also feeds the
    first SELF_CHECK_SEQUENCES sequences of every site of those layers to a SumCheck, which is
    scored before that batch reaches the writer, so a refused extraction writes nothing and no
    forward pass is spent on the check alone.

    Every planned site is snapshotted on the device at hook time (see snapshot.py): the staging
    copy and the statistics read the snapshot, so a block that modifies a hooked tensor in place
    afterwards changes neither. On CUDA the next batch's snapshots wait (on the GPU, not the
    host) for the side stream to have read the previous ones.
    """

    def __init__(self, plan: _Plan, out_dir: Path, model: nn.Module, check_layers=None, *,
                 first_shard: int = 0, ranges: dict | None = None):  # fmt: skip
        self.plan = plan
        self.model = model
        self.planned = {s.name for s in plan.sites}
        self.check_sites = (
            resolve_sites(model, check_layers, SUM_HOOK_TYPES) if check_layers else []
        )
        self.check_names = {s.name for s in self.check_sites}
        self.check: SumCheck | None = None  # the sum check of the batch in flight, if any
        self.check_result: dict | None = None
        self.cuda = plan.device.type == "cuda"
        # CUDA: device->host copies run on a side stream, so the forward never waits for them.
        self.copy_stream = torch.cuda.Stream(plan.device) if self.cuda else None
        names = [s.name for s in plan.sites]
        self.snaps = SiteSnapshots(
            names, plan.shapes, plan.batch_size, plan.context_size, plan.device, ranges
        )
        self.stats: dict[str, SiteStats] = self.snaps.stats
        shapes = {n: (plan.batch_size, plan.context_size, *plan.shapes[n]) for n in names}
        slots = POOL_SLOTS["cuda" if self.cuda else "cpu"]
        self.pool = StagingPool(slots, shapes, plan.dtype, self.cuda)  # (B, T, *shape)
        self.writer = ShardWriter(
            out_dir,
            plan.shapes,
            plan.context_size,
            plan.shard_sequences,
            plan.dtype,
            self.stats,
            release=self.pool.release,
            max_pending=slots,
            first_shard=first_shard,
        ).start()
        self.slot: Slot | None = None
        self.b = 0  # sequences in the batch in flight
        self.fired: set[str] = set()

    @property
    def capture_sites(self) -> list[Site]:
        """The planned sites, then the self-check's other sites (each site once)."""
        return self.plan.sites + [s for s in self.check_sites if s.name not in self.planned]

    def sink(self, site: Site, t: torch.Tensor) -> None:
        """Hook sink: one copy into the staging slot (and the sum check on the first batch)."""
        if self.check is not None and site.name in self.check_names:
            self.check(site, t[:SELF_CHECK_SEQUENCES])
        if site.name in self.planned:
            self._stage(site, t)

    def _stage(self, site: Site, t: torch.Tensor) -> None:
        want = (self.b, self.plan.context_size, *self.plan.shapes[site.name])  # (b, T, *shape)
        if tuple(t.shape) != want:
            raise ExtractionError(f"{site.name}: got shape {tuple(t.shape)}, want {want}")
        if site.name in self.fired:
            raise ExtractionError(
                f"{site.name}: {site.module_path} runs more than once per forward pass; "
                "choose a module that runs once"
            )
        dst = self.slot.buffers[site.name][: self.b]  # (b, T, *shape), pinned on CUDA
        if self.cuda:  # snapshot (b, T, *shape) on the device now, copied to the host later
            copy_on_stream(self.copy_stream, dst, self.snaps.take(site.name, t))
        else:  # CPU: the staging copy, taken now (in the storage dtype), is the snapshot
            dst.copy_(t)
        self.fired.add(site.name)

    def run_batch(self, cap, ids: torch.Tensor) -> None:
        """Forward one batch (b, T) and hand its staged activations to the writer."""
        slot = self.slot = self.pool.acquire()
        self.b = ids.shape[0]
        self.check = SumCheck() if self._check_pending else None  # fresh after an OOM retry
        if self.cuda:  # the snapshots are reused: the previous batch's copies must have read them
            torch.cuda.current_stream(self.plan.device).wait_stream(self.copy_stream)
        try:
            cap.forward(self._to_device(ids))
            self._score_check()
            self._after_forward(slot, ids)
            self.writer.submit(slot)
        except BaseException:
            self.pool.release(slot)
            raise
        finally:
            self.fired.clear()

    def _to_device(self, ids: torch.Tensor) -> torch.Tensor:
        # From pinned memory the upload is truly asynchronous: a pageable one waits for the GPU to
        # finish the previous batch first.
        if not self.cuda:
            return ids
        ids = ids if ids.is_pinned() else ids.pin_memory()
        return ids.to(self.plan.device, non_blocking=True)

    @property
    def _check_pending(self) -> bool:
        return bool(self.check_sites) and self.check_result is None

    def _score_check(self) -> None:
        """Score the sum check of the batch just forwarded; refuse branch sites if it failed."""
        if self.check is None:
            return
        self.check_result, self.check = self.check.result(self.model), None
        refuse_branch_sites(self.check_result, self.model)

    def _after_forward(self, slot: Slot, ids: torch.Tensor) -> None:
        missing = [s.name for s in self.plan.sites if s.name not in self.fired]
        if missing:
            raise ExtractionError(f"hooks did not fire for {missing}")
        if self.cuda:  # one stacked update per width group, from the snapshots (no GPU sync)
            self.snaps.update_stats(self.b)
        else:  # from the staged copies (stacked by width, in the snapshots' group order)
            self.snaps.update_stats_from(slot.stacks, self.b)
        if self.cuda:  # the inf/NaN counts travel with the batch: the writer never syncs the GPU
            copy_on_stream(self.copy_stream, slot.nonfinite, self.snaps.nonfinite_tensor())  # (S,)
            slot.event = torch.cuda.Event()  # the writer waits on it: all copies have landed
            slot.event.record(self.copy_stream)
        slot.n, slot.token_ids = ids.shape[0], ids.to(torch.int32)  # (b, T)

    def process(self, cap, batch: torch.Tensor) -> None:
        """Forward a (B, T) batch in chunks of the current batch size, halving it on GPU OOM."""
        start = 0
        while start < batch.shape[0]:
            chunk = batch[start : start + self.plan.batch_size_used]  # (b, T)
            try:
                self.run_batch(cap, chunk)
            except torch.OutOfMemoryError:
                self._shrink(chunk.shape[0])
                continue
            start += chunk.shape[0]

    def _shrink(self, failed: int) -> None:
        if self.cuda:
            torch.cuda.empty_cache()
        if failed <= 1 and self._check_pending:
            raise ExtractionError(
                f"out of GPU memory during the self-check on {SELF_CHECK_SEQUENCES} sequences of "
                f"{self.plan.context_size} tokens: use a shorter context or a smaller quantization"
            ) from None
        if failed <= 1:
            raise ExtractionError(
                f"out of GPU memory even at batch size 1 with context_size "
                f"{self.plan.context_size}: use a shorter context or a smaller quantization"
            ) from None
        self.plan.batch_size_used = failed // 2
        self.plan.notes.append(
            f"out of GPU memory at batch size {failed}; "
            f"continued with batch size {self.plan.batch_size_used}"
        )

    def finish(self) -> dict[str, list[dict]]:
        return self.writer.finish()

    def abort(self) -> None:
        self.writer.abort()


def _loop(
    run: _Run,
    model: nn.Module,
    batches: Iterator[torch.Tensor],
    total: int,
    on_progress: Callable[[int, int], None],
    should_cancel: Callable[[], bool],
) -> int:
    """Run every batch; returns the number of tokens processed."""
    done = 0
    with capture(model, run.capture_sites, run.sink) as cap:
        for batch in batches:  # (B, T)
            if should_cancel():
                raise ExtractionCancelled("extraction cancelled")
            run.process(cap, batch)
            done += batch.numel()
            on_progress(done, total)
    return done


def _plan(model: nn.Module, spec: ExtractionSpec) -> _Plan:
    device = model_device(model)
    dtype = spec.storage_dtype(device)
    d = hidden_size(model.config)
    sites = spec.sites(model)
    shapes = site_shapes(model, sites, d)
    widest = max(math.prod(shape) for shape in shapes.values())  # shard bytes follow the widest
    shard = min(
        spec.shard_sequences
        or shard_sequences_for(
            widest, spec.context_size, dtype, max_samples=spec.max_samples,
            shard_bytes=spec.shard_bytes,
        ),
        spec.max_samples,
    )  # fmt: skip
    batch = min(spec.batch_size, spec.max_samples)
    return _Plan(sites, device, dtype, d, shapes, spec.context_size, batch, shard, batch)


def site_shapes(model: nn.Module, sites: list[Site], d: int) -> dict[str, tuple[int, ...]]:
    """{site name: shape of one token's tensor}: known for the named sites, probed with one
    forward on 3 tokens for module paths. ExtractionError when a module's tensor is unusable."""
    try:
        shapes = {site.name: known_shape(model, site, d) for site in sites}
        unknown = [site for site in sites if shapes[site.name] is None]
        if unknown:
            shapes.update(probe_shapes(model, unknown))
    except HookSiteError as exc:
        raise ExtractionError(str(exc)) from exc
    return shapes


def _prepare_dir(out_dir: Path) -> None:
    if (out_dir / MANIFEST_NAME).exists():
        raise ExtractionError(f"{out_dir} already holds a finished extraction")
    remove_partial(out_dir)  # leftovers of a crashed attempt: only listed shards are trusted
    out_dir.mkdir(parents=True, exist_ok=True)


def run_extraction(
    model: nn.Module,
    tokenizer,
    texts: Iterable[Document],
    spec: ExtractionSpec,
    out_dir: Path,
    *,
    meta: dict,
    on_progress: Callable[[int, int], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> dict:
    """Extract activations of `spec`'s sites over `texts` into `out_dir`; returns the manifest.

    meta: model_id, repo, commit, quantization, dataset_id, tokenizer (a name; default the
    tokenizer's name_or_path), recorded in their manifest sections, missing keys null; other
    JSON-ready keys (e.g. extraction_id) go to manifest["meta"].
    on_progress(done_tokens, total_tokens) is called after every batch and once at the end
    with done == total. Raises ExtractionCancelled (partial files removed) when should_cancel()
    turns true between batches, ExtractionError with a readable message otherwise (bad spec,
    branch sites refused by the self-check, inf/NaN activations, GPU out of memory at batch 1).
    """
    spec.validate(model)
    model.eval()
    plan = _plan(model, spec)
    out_dir = Path(out_dir)
    _prepare_dir(out_dir)
    report = on_progress or _ignore_progress
    try:
        manifest = _extract(model, tokenizer, texts, spec, plan, out_dir, meta, report,
                            should_cancel or _never)  # fmt: skip
    except NonFiniteError as exc:
        remove_partial(out_dir)
        raise ExtractionError(f"{exc}; nothing was kept") from exc
    except BaseException:
        remove_partial(out_dir)
        raise
    report(manifest["n_tokens"], manifest["n_tokens"])
    return manifest


def _extract(model, tokenizer, texts, spec, plan, out_dir, meta, report, should_cancel) -> dict:
    """The body of run_extraction: batch loop (self-check on the first), shards, manifest."""
    batches = _batches(tokenizer, texts, spec, plan)
    first = next(batches, None)
    if first is None:
        raise ExtractionError(f"the dataset has fewer than {spec.context_size} tokens")
    branches = BRANCH_HOOK_TYPES & set(spec.canonical_hook_types())
    run = _Run(plan, out_dir, model, check_layers=spec.layers if branches else None)
    try:
        total = token_budget(spec.max_samples, spec.context_size)
        report(0, total)
        done = _loop(run, model, chain([first], batches), total, report, should_cancel)
        records = run.finish()
    except BaseException:
        run.abort()
        raise
    manifest = build_manifest(
        model, tokenizer, spec, plan, records, run.stats, run.check_result, meta, done
    )
    write_manifest(out_dir, manifest)
    return manifest


def _batches(tokenizer, texts, spec: ExtractionSpec, plan: _Plan) -> Iterator[torch.Tensor]:
    """(B, T) int64 batches of packed tokens; on CUDA made ahead on a thread, in pinned memory."""
    seqs = pack_documents(
        tokenizer, texts, spec.context_size, spec.max_samples, special_tokens=spec.special_tokens
    )
    batches = batched(seqs, plan.batch_size)
    if plan.device.type == "cuda":
        batches = prefetch(b.pin_memory() for b in batches)
    try:
        yield from batches
    except ValueError as exc:  # the tokenizer cannot pack (no EOS, context too short)
        raise ExtractionError(str(exc)) from exc


def _ignore_progress(done: int, total: int) -> None:
    pass


def _never() -> bool:
    return False


# ---------------------------------------------------------------------------------------------
# Manifest


def _tokenizer_info(tokenizer, meta: dict) -> dict:
    return {
        # a Hub repo id and the commit (a local path only when the caller gives no repo)
        "name": meta.get("tokenizer") or getattr(tokenizer, "name_or_path", None) or None,
        "revision": meta.get("tokenizer_revision"),
        "class": type(tokenizer).__name__,
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "special_token_ids": sorted(int(i) for i in tokenizer.all_special_ids),
    }


_META_KEYS = frozenset({"model_id", "repo", "revision", "commit", "quantization", "dataset_id",
                        "dataset", "tokenizer", "tokenizer_revision"})  # fmt: skip


def _model_info(model: nn.Module, meta: dict) -> dict:
    config = model.config
    return {
        "id": meta.get("model_id"),
        "repo": meta.get("repo"),
        "revision": meta.get("revision"),
        "commit": meta.get("commit"),
        "quantization": meta.get("quantization"),
        "dtype": dtype_name(compute_dtype(model)),
        "architecture": getattr(config, "model_type", None),
        "num_layers": num_layers(config),
        "hidden_size": hidden_size(config),
    }


def build_manifest(model, tokenizer, spec, plan, records, stats, check, meta, done) -> dict:
    """The manifest.json content (architecture.md §5), JSON-ready."""
    context = spec.context_size
    return {
        "schema_version": SCHEMA_VERSION,
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "model": _model_info(model, meta),
        "tokenizer": _tokenizer_info(tokenizer, meta),
        "dataset": {"id": meta.get("dataset_id"), **(meta.get("dataset") or {})},
        "meta": {k: v for k, v in meta.items() if k not in _META_KEYS},
        "context_size": context,
        "bos_policy": bos_policy(tokenizer),
        "special_tokens": spec.special_tokens,
        "document_separator": "eos",
        "n_sequences": done // context,
        "n_tokens": done,
        "batch_size": {"requested": spec.batch_size, "used": plan.batch_size_used},
        "shard_sequences": plan.shard_sequences,
        "spec": asdict(spec),
        "self_check": check,
        "environment": {"python_libraries": library_versions(), "device": str(model_device(model))},
        "notes": plan.notes,
        "hooks": [
            _hook_entry(site, plan, records[site.name], stats[site.name]) for site in plan.sites
        ],
    }


def _hook_entry(site: Site, plan: _Plan, shards: list[dict], stats: SiteStats) -> dict:
    shape = plan.shapes[site.name]  # one token's tensor: (d,), (H, d_head), …
    return {
        "name": site.name,
        "layer": site.layer,
        "hook_type": site.hook_type,
        "module_path": site.module_path,
        "reads": site.reads,
        "d": math.prod(shape),
        "shape": list(shape),
        "dtype": dtype_name(plan.dtype),
        "shards": shards,
        "statistics": _finite(stats.to_dict()),
    }


def _finite(obj):
    """JSON has no inf/NaN: they become None (only possible for empty statistics)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj
