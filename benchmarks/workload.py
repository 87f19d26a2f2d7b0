"""The extraction benchmark's workload: a random-weight GPT-2-small saved offline, a fixed corpus,
the token stream every method reads, and the sites every method writes.

Nothing is downloaded: the model is `GPT2LMHeadModel(GPT2Config())` (12 layers × 768) with seeded
random weights, the tokenizer is the byte-level BPE that `mistudio.testing.tiny_models` trains.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

from mistudio.testing.tiny_models import build_tokenizer
from models_app.ml.configs import num_layers
from models_app.ml.hooks import Site, resolve_sites
from models_app.ml.tokens import batched, pack_documents

_WORDS = [
    *("the", "a", "model", "layer", "token", "stream", "residual", "attention", "sparse"),
    *("feature", "river", "garden", "train", "city", "morning", "question", "answer", "number"),
    *("history", "science", "window", "rose", "boat", "library", "weight", "cache", "of", "and"),
    *("to", "in", "is", "was", "for", "on", "that", "with", "as", "it", "by", "at", "from"),
]
RESIDUAL = ("residual",)
ALL_HOOKS = ("residual", "mlp", "attention")
EVERY_SITE = ("residual", "mlp", "attention", "resid_pre", "z")  # at every layer
HOOK_SETS = {"residual": RESIDUAL, "all": ALL_HOOKS, "every": EVERY_SITE}


@dataclass
class Workload:
    """What every method of one benchmark run shares."""

    model_dir: Path  # saved model + tokenizer
    texts: list[str]  # the corpus our extraction tokenizes itself
    tokens: torch.Tensor  # (N, T) int64: the same sequences, packed, for the other methods
    batch_size: int  # sequences per forward (B)

    @property
    def n_tokens(self) -> int:
        return self.tokens.numel()

    def head(self, n: int) -> Workload:
        """The first `n` sequences (our extraction stops there too: it packs the same texts)."""
        return Workload(self.model_dir, self.texts, self.tokens[:n], self.batch_size)

    def batches(self) -> list[torch.Tensor]:
        """The token stream as (B, T) batches."""
        return list(self.tokens.split(self.batch_size))


def gpt2_config(shape: Sequence[int] = (12, 768)) -> GPT2Config:
    """A GPT-2 config of `shape` = (layers, width), 64-wide heads (GPT-2-small: (12, 768))."""
    layers, width = shape
    return GPT2Config(n_layer=layers, n_embd=width, n_head=max(1, width // 64))


def build_model_dir(out_dir: Path, config: GPT2Config | None = None, seed: int = 0) -> Path:
    """Save a random-init GPT-2 (default: GPT-2-small shape) and a tokenizer into `out_dir`."""
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config or GPT2Config())
    model.save_pretrained(out_dir)
    build_tokenizer(out_dir, add_bos=False)
    return Path(out_dir)


def load_tokenizer(model_dir: Path):
    """The saved tokenizer; documents longer than the model's context are fine (we pack them)."""
    return AutoTokenizer.from_pretrained(
        model_dir, local_files_only=True, model_max_length=sys.maxsize
    )


def iter_corpus(seed: int = 0) -> Iterator[str]:
    """An endless stream of deterministic pseudo-English documents of 20 to 400 words."""
    rng = random.Random(seed)
    while True:
        yield " ".join(rng.choices(_WORDS, k=rng.randint(20, 400)))


def corpus(n_docs: int, seed: int = 0) -> list[str]:
    """The first `n_docs` documents of `iter_corpus(seed)`."""
    return list(islice(iter_corpus(seed), n_docs))


def make_workload(model_dir: Path, n_sequences: int, context_size: int, batch_size: int):
    """A corpus just long enough for `n_sequences` packed sequences of `context_size` tokens."""
    tokenizer = load_tokenizer(model_dir)
    n_docs = max(4, n_sequences * context_size // 300)
    while True:
        texts = corpus(n_docs)
        seqs = list(pack_documents(tokenizer, texts, context_size, n_sequences))
        if len(seqs) == n_sequences:
            return Workload(Path(model_dir), texts, torch.stack(seqs), batch_size)
        n_docs *= 2


def token_batches(tokens: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """(N, T) -> [(B, T), ...] the way our extraction batches them."""
    return list(batched(iter(tokens), batch_size))


def every_layer(model_or_config) -> list[int]:
    """Every block index of a model (or of its config): the layers of the every-site workload."""
    return list(range(num_layers(getattr(model_or_config, "config", model_or_config))))


def sites_for(model, layers: list[int], hook_types: tuple[str, ...]) -> list[Site]:
    """Our sites (TransformerLens names) for `layers` × `hook_types`, layer by layer."""
    return resolve_sites(model, layers, list(hook_types))


def write_site_shards(out_dir: Path, acts: dict[str, torch.Tensor], token_ids: torch.Tensor):
    """Write one safetensors file per site in our shard layout; returns the bytes written.

    acts: {site name: (n, T, d)} already in the storage dtype; token_ids (n, T). This is what the
    peer methods do with their captured tensors, so every method puts the same bytes on disk.
    """
    ids = token_ids.to(torch.int32).contiguous()  # (n, T)
    total = 0
    for name, tensor in acts.items():
        path = out_dir / "shards" / name / "000000.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"activations": tensor.contiguous(), "token_ids": ids}, path)
        total += path.stat().st_size
    return total
