"""What an extraction holds, for the page: the first sequences' tokens with their activation norm
at one site (read from the shards with the reader, decoded with the model's own tokenizer)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mistudio.errors import Conflict, Invalid

from .extraction import model_tokenizer
from .ml.reader import ReaderError, open_extraction
from .models import ExtractionStatus
from .selectors import extraction_get

TOKEN_VIEW_SEQUENCES = 4


@dataclass(frozen=True)
class Token:
    text: str  # the token decoded on its own (newlines shown as ⏎)
    token_id: int
    norm: float  # ‖x‖₂ at the site
    shade: float  # 0..1: (norm − lo) / (hi − lo) over the tokens shown
    special: bool


@dataclass(frozen=True)
class TokenView:
    site: str
    sites: list[str]
    sequences: list[list[Token]]
    lo: float
    hi: float


def extraction_token_view(extraction_id: str, site: str | None = None,
                          n_seq: int = TOKEN_VIEW_SEQUENCES) -> TokenView:  # fmt: skip
    """The first `n_seq` sequences of a completed extraction, each token with its L2 norm at
    `site` (default: the first stored site). Conflict (409) unless completed; Invalid (422) for
    a site it does not hold or shards that cannot be read."""
    job = extraction_get(extraction_id)
    if job.status != ExtractionStatus.COMPLETED:
        raise Conflict(f"Extraction {job.pk} is {job.status}: nothing to show yet.")
    try:
        ext = open_extraction(job.output_path)
        sites = [s.name for s in ext.sites]
        site = site or sites[0]
        batch = next(ext.sequences(site, batch_size=n_seq))
    except (ReaderError, StopIteration) as exc:
        raise Invalid(str(exc) or "this extraction holds no sequences") from exc
    norms = norms_of(batch[site])  # [n, T]
    ids = batch["token_ids"]  # [n, T]
    lo, hi = float(norms.min()), float(norms.max())
    tokenizer = model_tokenizer(job.model.local_path)
    special = set(ext.special_token_ids)
    sequences = [
        [_token(tokenizer, i, float(v), lo, hi, special) for i, v in zip(row_ids, row, strict=True)]
        for row_ids, row in zip(ids.tolist(), norms.tolist(), strict=True)
    ]
    return TokenView(site, sites, sequences, lo, hi)


def _token(tokenizer, token_id: int, norm: float, lo: float, hi: float, special: set) -> Token:
    text = tokenizer.decode([token_id]).replace("\n", "⏎")
    shade = (norm - lo) / (hi - lo) if hi > lo else 0.0
    return Token(text, token_id, norm, round(shade, 3), token_id in special)


def norms_of(batch: torch.Tensor) -> torch.Tensor:
    """‖x‖₂ per token of [n, T, *shape] activations → [n, T]."""
    return batch.float().flatten(2).norm(dim=-1)
