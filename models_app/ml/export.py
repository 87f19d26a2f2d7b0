"""Export an extraction folder as the Hugging Face `datasets` folder SAELens trains from.

SAELens (6.x) with `use_cached_activations=True, cached_activations_path=OUT` opens OUT with
`datasets.load_from_disk` and reads, per row (one sequence), a column named after the hook,
`Array2D(shape=(context_size, d_in))`, and `token_ids`, `Sequence(int32, length=context_size)`
(its own CacheActivationsRunner writes exactly that; sae_lens/cache_activations_runner.py).
Our hook names already are SAELens's, so only the container changes.

The rows are produced by the reader (one shard at a time) and written by `datasets` itself
(`Dataset.from_generator`, `writer_batch_size` rows per Arrow record batch, then `save_to_disk`):
memory is one shard plus one record batch, whatever the extraction's size. `datasets`' working
files go to a temporary folder beside OUT (never the shared HF cache) and are removed.
Arrow has no bfloat16: bfloat16 shards are exported as float32 (exact) unless `dtype` says
float16. A per-token shape of more than one dimension (hook_z: (n_heads, d_head)) is flattened
to n_heads * d_head, as SAELens's hook_z SAEs read it.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .reader import TOKEN_IDS, Extraction, ReaderError, open_extraction

if TYPE_CHECKING:
    import datasets

EXPORT_DTYPES = ("float32", "float16")
_RECORD_BATCH_BYTES = 64 * 2**20  # rows buffered by the Arrow writer before each write


class ExportError(RuntimeError):
    """An export that cannot be made (unknown site, dtype, an existing output folder)."""


class ExportCancelled(Exception):
    """Raised by an `on_progress` callback to stop an export; nothing is left in out_dir."""


def export_saelens(
    extraction_dir: str | Path,
    out_dir: str | Path,
    *,
    sites: list[str] | None = None,
    dtype: str | None = None,
    verify: bool = True,
    on_progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write `extraction_dir`'s sites (default: all) to `out_dir` as a `datasets` folder.

    One row per sequence: {hook name: float [context_size, d], "token_ids": int32 [context_size]}.
    dtype: "float32" (default) or "float16". verify: check each shard's sha256 as it is read.
    on_progress(done_sequences, total_sequences) may raise ExportCancelled to stop. Raises
    ExportError (out_dir exists, bad site or dtype) or reader.ReaderError (missing or altered
    shard); nothing is left in out_dir then.
    """
    ext = open_extraction(extraction_dir)
    names = [s.name for s in ext.sites] if sites is None else list(sites)
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise ExportError(f"{out_dir} already exists: choose a new folder")
    dtype = dtype or "float32"
    if dtype not in EXPORT_DTYPES:
        raise ExportError(f"dtype must be one of {', '.join(EXPORT_DTYPES)}, not {dtype}")
    features = _features(ext, names, dtype)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".export-", dir=out_dir.parent))
    try:
        ds = _generate(ext, names, features, work, verify, on_progress)
        ds.save_to_disk(str(out_dir))
    except BaseException:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out_dir


def _generate(ext, names, features, work: Path, verify, on_progress) -> datasets.Dataset:
    """The Arrow table, written by `datasets` into `work`; our own errors come out unwrapped."""
    import datasets  # pyarrow and pandas (~0.4 s): only an export needs them

    try:
        return datasets.Dataset.from_generator(
            _rows,
            features=features,
            cache_dir=str(work),
            writer_batch_size=_rows_per_record_batch(ext, names),
            fingerprint=_fingerprint(ext, names, features),  # not a hash of gen_kwargs (a tqdm bar)
            # a list in gen_kwargs would be split into generator shards: the names go as a tuple
            gen_kwargs={
                "path": str(ext.path),
                "names": tuple(names),
                "verify": verify,
                "on_progress": on_progress,
            },  # fmt: skip
        )
    except datasets.exceptions.DatasetGenerationError as exc:
        # ours, and the true reason of a write that failed (a full disk: OSError ENOSPC)
        if isinstance(exc.__cause__, (ReaderError, ExportError, ExportCancelled, OSError)):
            raise exc.__cause__ from None
        raise


def _fingerprint(ext: Extraction, names: list[str], features: datasets.Features) -> str:
    """What the rows are made of: the listed shards' sha256, the sites and the column types."""
    shards = [s["sha256"] for h in ext.manifest["hooks"] if h["name"] in names for s in h["shards"]]
    blob = json.dumps([names, shards, str(features)]).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


def _features(ext: Extraction, names: list[str], dtype: str) -> datasets.Features:
    import datasets  # see _generate

    by_name = {s.name: s for s in ext.sites}
    unknown = [n for n in names if n not in by_name]
    if unknown or not names:
        raise ExportError(f"no site {unknown[0] if unknown else '(none chosen)'!r} in this"
                          f" extraction; stored: {', '.join(by_name)}")  # fmt: skip
    columns: dict = {
        name: datasets.Array2D(
            shape=(ext.context_size, math.prod(by_name[name].shape)), dtype=dtype
        )  # fmt: skip
        for name in names
    }
    columns[TOKEN_IDS] = datasets.Sequence(datasets.Value("int32"), length=ext.context_size)
    return datasets.Features(columns)


def _rows_per_record_batch(ext: Extraction, names: list[str]) -> int:
    by_name = {s.name: s for s in ext.sites}
    row_bytes = sum(ext.context_size * math.prod(by_name[n].shape) * 4 for n in names)
    return max(1, _RECORD_BATCH_BYTES // max(1, row_bytes))


def _rows(path: str, names: tuple[str, ...], verify: bool, on_progress) -> Iterator[dict]:
    """One dict per sequence, shard by shard (a generator `datasets` calls in this process)."""
    ext = open_extraction(path)
    done = 0
    for batch in ext.sequences(list(names), batch_size=64, verify=verify):
        flat = {n: batch[n].flatten(2).to(torch.float32).numpy() for n in names}  # [b, T, d]
        ids = batch[TOKEN_IDS].to(torch.int32).numpy()  # [b, T]
        for i in range(ids.shape[0]):
            yield {**{n: flat[n][i] for n in names}, TOKEN_IDS: ids[i]}
        done += ids.shape[0]
        if on_progress is not None:
            on_progress(done, ext.n_sequences)
