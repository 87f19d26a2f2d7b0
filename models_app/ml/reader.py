"""Read an extraction folder as torch tensors, in bounded memory, without Django.

    from models_app.ml.reader import open_extraction

    ext = open_extraction("data/activations/x_…")
    for site in ext.sites:                       # name, layer, hook_type, shape per token, dtype
        print(site)
    for batch in ext.tokens(["blocks.1.hook_resid_post"], batch_size=4096, shuffle=True,
                            exclude_special_tokens=True):
        x = batch["blocks.1.hook_resid_post"]    # [batch_size, d]
        ids = batch["token_ids"]                 # [batch_size] int64

The format is the one `storage.py` writes: shard k of every site holds the same sequences, so the
sites of one shard line up token by token. Shards are opened with safetensors (memory-mapped) and
read one at a time (or `shuffle_shards` at a time when shuffling), so memory is about
`shuffle_shards × shard size × sites` whatever the extraction's size. `verify=True` recomputes each
shard's sha256 before its first read and raises ReaderError on a mismatch (`open_extraction(path,
verify=True)` checks every shard up front); a missing, truncated or unreadable shard and a manifest
that is not valid JSON or lacks a key always raise ReaderError naming the file.

`dataset(...)` works with a DataLoader's `num_workers`: worker i of n reads blocks i, i+n, … of
the same (seeded) order, so every token or sequence is yielded exactly once.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from math import prod
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from .storage import StorageError, read_manifest, sha256_file

ACTIVATIONS = "activations"
TOKEN_IDS = "token_ids"
MANIFEST = "manifest.json"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ReaderError(RuntimeError):
    """An extraction folder that cannot be read as its manifest describes (manifest missing, not
    JSON or lacking keys; missing, truncated or altered shard; unknown site); the message names
    the file or site."""


@dataclass(frozen=True)
class SiteInfo:
    """One stored site: `shape` is per token (e.g. (d,) or (n_heads, d_head)); `dtype` as stored;
    `d` is the flattened width per token (d_model, or n_heads × d_head for per-head sites)."""

    name: str
    layer: int | None
    hook_type: str
    shape: tuple[int, ...]
    dtype: str
    n_shards: int

    @property
    def d(self) -> int:
        """Values per token once flattened: prod(shape)."""
        return prod(self.shape)


class Extraction:
    """An extraction folder (manifest.json + shards/). See the module docstring for an example."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.manifest = read_manifest(self.path)
        except StorageError as exc:
            raise ReaderError(str(exc)) from exc
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ReaderError(f"{MANIFEST}: cannot be read as JSON ({exc})") from exc
        _check_manifest(self.manifest)
        self._hooks = {h["name"]: h for h in self.manifest["hooks"]}
        self._verified: set[str] = set()
        self.context_size: int = self.manifest["context_size"]
        self.n_sequences: int = self.manifest["n_sequences"]
        self.n_tokens: int = self.manifest["n_tokens"]

    @property
    def sites(self) -> list[SiteInfo]:
        """The stored sites, in manifest order."""
        return [self._site(name) for name in self._hooks]

    def _site(self, name: str) -> SiteInfo:
        hook = self._hooks[name]
        shape = tuple(hook.get("shape") or (hook["d"],))
        return SiteInfo(name, hook.get("layer"), hook["hook_type"], shape, hook["dtype"],
                        len(hook["shards"]))  # fmt: skip

    @property
    def special_token_ids(self) -> list[int]:
        """BOS/EOS/pad (and any other special) ids the manifest records for the tokenizer."""
        tok = self.manifest.get("tokenizer")
        tok = tok if isinstance(tok, dict) else {}
        listed = tok.get("special_token_ids")
        ids = list(listed) if isinstance(listed, list) else []
        ids += [tok.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")]
        return sorted({i for i in ids if isinstance(i, int) and not isinstance(i, bool)})

    def verify(self) -> None:
        """Recompute every shard's sha256 (ReaderError on the first missing or altered one)."""
        for hook in self._hooks.values():
            for shard in hook["shards"]:
                self._check(shard, verify=True)

    def sequences(
        self,
        sites: Sequence[str] | str | None = None,
        *,
        batch_size: int = 8,
        shuffle: bool = False,
        seed: int = 0,
        shuffle_shards: int = 2,
        dtype: torch.dtype | None = None,
        verify: bool = False,
        part: tuple[int, int] = (0, 1),
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Batches {site: [b, T, *shape], "token_ids": [b, T] int64}, b <= batch_size.

        shuffle: shards in a random order, sequences mixed across `shuffle_shards` shards at a
        time (memory: that many shards). dtype: convert activations (default: as stored).
        part=(i, n): only blocks i, i+n, … of the same order (how `dataset` splits the work
        between DataLoader workers; the n parts together are every sequence once).
        """
        names = self._names(sites)
        for block in self._blocks(names, shuffle, seed, shuffle_shards, verify, part):
            order = _order(block[TOKEN_IDS].shape[0], shuffle, seed)
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                yield _take(block, rows, dtype)

    def tokens(
        self,
        sites: Sequence[str] | str | None = None,
        *,
        batch_size: int = 4096,
        shuffle: bool = False,
        seed: int = 0,
        shuffle_shards: int = 2,
        exclude_special_tokens: bool = False,
        dtype: torch.dtype | None = None,
        verify: bool = False,
        part: tuple[int, int] = (0, 1),
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Batches {site: [n, *shape], "token_ids": [n] int64}, n <= batch_size (the last
        batches of a block may be smaller). exclude_special_tokens drops the positions whose id
        is in `special_token_ids` (BOS/EOS/pad as the manifest records them). part: as in
        `sequences`."""
        names = self._names(sites)
        special = torch.tensor(self.special_token_ids, dtype=torch.int64)
        for block in self._blocks(names, shuffle, seed, shuffle_shards, verify, part):
            flat = {k: v.flatten(0, 1) for k, v in block.items()}  # [n_seq*T, ...]
            keep = torch.arange(flat[TOKEN_IDS].shape[0])
            if exclude_special_tokens and len(special):
                keep = keep[~torch.isin(flat[TOKEN_IDS], special)]
            if shuffle:
                keep = keep[torch.randperm(len(keep), generator=_generator(seed))]
            for start in range(0, len(keep), batch_size):
                yield _take(flat, keep[start : start + batch_size], dtype)

    def dataset(self, sites: Sequence[str] | str | None = None, *, unit: str = "tokens",
                **options) -> IterableDataset:  # fmt: skip
        """A torch IterableDataset over `tokens(...)` (unit="tokens") or `sequences(...)`, one
        item per token or sequence ({site: tensor, "token_ids": id(s)}); options as those take."""
        if unit not in ("tokens", "sequences"):
            raise ValueError("unit must be 'tokens' or 'sequences'")
        return _Items(self, self._names(sites), unit, options)

    def sequence_dataset(self, sites: Sequence[str] | str | None = None) -> Dataset:
        """A map-style Dataset: item i is sequence i ({site: [T, *shape], "token_ids": [T]}),
        read from its shard on access (memory-mapped)."""
        return _SequenceDataset(self, self._names(sites))

    # -- internals -------------------------------------------------------------------------

    def _names(self, sites: Sequence[str] | str | None) -> list[str]:
        names = [sites] if isinstance(sites, str) else list(sites or self._hooks)
        unknown = [n for n in names if n not in self._hooks]
        if unknown:
            raise ReaderError(f"no site {unknown[0]!r} here; stored: {', '.join(self._hooks)}")
        return names

    def _check(self, shard: dict, *, verify: bool) -> Path:
        path = self.path / shard["file"]
        if not path.is_file():
            raise ReaderError(f"{shard['file']}: missing (the manifest lists it)")
        if verify and shard["file"] not in self._verified:
            if sha256_file(path) != shard["sha256"]:
                raise ReaderError(f"{shard['file']}: sha256 does not match the manifest (altered)")
            self._verified.add(shard["file"])
        return path

    def _read(self, names: list[str], k: int, rows: slice, verify: bool) -> dict:
        out: dict[str, torch.Tensor] = {}
        for name in names:
            shard = self._hooks[name]["shards"][k]
            path = self._check(shard, verify=verify)
            try:
                with safe_open(path, framework="pt") as f:
                    out[name] = f.get_slice(ACTIVATIONS)[rows]
                    if TOKEN_IDS not in out:
                        out[TOKEN_IDS] = f.get_slice(TOKEN_IDS)[rows].to(torch.int64)
            except (SafetensorError, OSError, ValueError, KeyError, RuntimeError) as exc:
                raise ReaderError(f"{shard['file']}: cannot be read ({exc})") from exc
        return out

    def _blocks(self, names, shuffle, seed, shuffle_shards, verify, part=(0, 1)) -> Iterator[dict]:
        """Whole shards, one at a time, or `shuffle_shards` concatenated in a random order;
        part=(i, n) keeps blocks i, i+n, … only."""
        order = list(range(len(self._hooks[names[0]]["shards"])))
        group = 1
        if shuffle:
            random.Random(seed).shuffle(order)
            group = max(1, shuffle_shards)
        index, count = part
        for start in range(index * group, len(order), group * count):
            chosen = order[start : start + group]
            parts = [self._read(names, k, slice(None), verify) for k in chosen]
            if len(parts) == 1:
                block = parts.pop()
            else:  # one copy, and the parts are freed before the block is used
                block = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
                parts.clear()
            yield block
            del block

    def _locate(self, index: int) -> tuple[int, int]:
        """(shard k, row in shard) of sequence `index`."""
        shards = next(iter(self._hooks.values()))["shards"]
        for k, shard in enumerate(shards):
            if index < shard["n_seq"]:
                return k, index
            index -= shard["n_seq"]
        raise IndexError("sequence index out of range")


def open_extraction(path: str | Path, *, verify: bool = False) -> Extraction:
    """Open an extraction folder. ReaderError when it has no manifest (never finished) or the
    manifest is not what storage.py writes; verify=True also recomputes every shard's sha256 now
    (ReaderError naming the first missing or altered shard), so later reads need no `verify=`."""
    ext = Extraction(path)
    if verify:
        ext.verify()
    return ext


_MANIFEST_KEYS = {"hooks": list, "context_size": int, "n_sequences": int, "n_tokens": int}
_HOOK_KEYS = {"name": str, "hook_type": str, "dtype": str, "shards": list}
_SHARD_KEYS = {"file": str, "sha256": str, "n_seq": int}


def _check_manifest(manifest) -> None:
    """ReaderError naming the first thing that is not as storage.py writes it."""
    _check_keys(manifest, _MANIFEST_KEYS, MANIFEST)
    if not manifest["hooks"]:
        raise ReaderError(f"{MANIFEST}: 'hooks' is empty (no sites stored)")
    n_shards = None
    for i, hook in enumerate(manifest["hooks"]):
        where = f"{MANIFEST}: hooks[{i}]"
        _check_keys(hook, _HOOK_KEYS, where)
        if not isinstance(hook.get("shape") or hook.get("d"), (int, list)):
            raise ReaderError(f"{where}: needs 'shape' (a list) or 'd' (an int)")
        for j, shard in enumerate(hook["shards"]):
            _check_keys(shard, _SHARD_KEYS, f"{where}.shards[{j}]")
        if n_shards not in (None, len(hook["shards"])):
            raise ReaderError(f"{where}: {len(hook['shards'])} shards, other sites {n_shards}")
        n_shards = len(hook["shards"])


def _check_keys(value, keys: dict, where: str) -> None:
    if not isinstance(value, dict):
        raise ReaderError(f"{where}: expected a JSON object, found {type(value).__name__}")
    for key, kind in keys.items():
        if key not in value:
            raise ReaderError(f"{where}: missing key {key!r}")
        if not isinstance(value[key], kind) or isinstance(value[key], bool) and kind is int:
            raise ReaderError(f"{where}: {key!r} should be {kind.__name__}")


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _order(n: int, shuffle: bool, seed: int) -> torch.Tensor:
    return torch.randperm(n, generator=_generator(seed)) if shuffle else torch.arange(n)


def _take(block: dict[str, torch.Tensor], rows: torch.Tensor, dtype) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in block.items():
        value = value[rows]
        out[key] = value.to(dtype) if dtype is not None and key != TOKEN_IDS else value
    return out


class _Items(IterableDataset):
    def __init__(self, ext: Extraction, names: list[str], unit: str, options: dict):
        self.ext, self.names, self.unit, self.options = ext, names, unit, options

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """Every item once in all: DataLoader worker i of n reads blocks i, i+n, … only."""
        worker = get_worker_info()
        part = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        read = getattr(self.ext, self.unit)
        batches: Iterable[dict] = read(self.names, **self.options, part=part)
        for batch in batches:
            for i in range(batch[TOKEN_IDS].shape[0]):
                yield {key: value[i] for key, value in batch.items()}


class _SequenceDataset(Dataset):
    def __init__(self, ext: Extraction, names: list[str]):
        self.ext, self.names = ext, names

    def __len__(self) -> int:
        return self.ext.n_sequences

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        k, row = self.ext._locate(index)
        block = self.ext._read(self.names, k, slice(row, row + 1), verify=False)
        return {key: value[0] for key, value in block.items()}
