"""Token pipeline: the model's own tokenizer, documents packed into fixed-length sequences.

Packing (no padding, so no padded positions hold garbage activations):
    [BOS] doc1 tokens … EOS doc2 tokens … EOS doc3 …      cut every `context_size` tokens
- EOS separates consecutive documents;
- when the tokenizer adds a BOS of its own, every sequence starts with BOS at position 0 and carries
  `context_size - 1` stream tokens (a document cut at a boundary goes on after the next BOS);
- the last partial sequence is dropped.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from itertools import islice
from typing import TypeVar

import torch

T = TypeVar("T")
PROBE_TEXT = "Hello world"
ENCODE_CHUNK = 64  # documents tokenized per call: batch speed without holding the dataset


def adds_bos(tokenizer) -> bool:
    """True when the tokenizer puts its BOS token first on its own (Llama/Qwen-like, not GPT-2)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer(PROBE_TEXT, add_special_tokens=True)["input_ids"]
    plain = tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]
    return len(ids) > 0 and ids[0] == bos and (not plain or plain[0] != bos)


def bos_policy(tokenizer) -> str:
    """'bos_at_position_0' or 'no_bos', as recorded in the manifest."""
    return "bos_at_position_0" if adds_bos(tokenizer) else "no_bos"


def _eos_id(tokenizer) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token to separate documents")
    return int(eos)


def iter_document_ids(tokenizer, texts: Iterable[str]) -> Iterator[list[int]]:
    """Token ids of each non-empty document, without special tokens, chunk by chunk."""
    it = iter(texts)
    while chunk := list(islice(it, ENCODE_CHUNK)):
        docs = [t for t in chunk if t]
        if docs:
            yield from tokenizer(docs, add_special_tokens=False)["input_ids"]


def _token_stream(tokenizer, texts: Iterable[str]) -> Iterator[list[int]]:
    """Documents' ids with EOS between consecutive documents (a separator, not a terminator)."""
    eos = _eos_id(tokenizer)
    first = True
    for ids in iter_document_ids(tokenizer, texts):
        if not ids:
            continue
        yield ids if first else [eos, *ids]
        first = False


def pack_documents(
    tokenizer, texts: Iterable[str], context_size: int, max_sequences: int | None = None
) -> Iterator[torch.Tensor]:
    """Yield int64 tensors of shape (context_size,), streaming: at most one document is held.

    Stops after `max_sequences` sequences, or when the texts run out (the last partial sequence is
    dropped). Raises ValueError when context_size is too small or the tokenizer has no EOS.
    """
    bos = tokenizer.bos_token_id if adds_bos(tokenizer) else None
    prefix = [] if bos is None else [int(bos)]
    body = context_size - len(prefix)
    if body < 1:
        raise ValueError(f"context_size {context_size} leaves no room for tokens after BOS")
    remaining = max_sequences  # None: until the texts run out
    buffer: list[int] = []
    for ids in _token_stream(tokenizer, texts) if remaining != 0 else ():
        buffer.extend(ids)
        start = 0
        while len(buffer) - start >= body:
            if remaining == 0:
                return
            yield torch.tensor(prefix + buffer[start : start + body], dtype=torch.long)
            start += body
            remaining = None if remaining is None else remaining - 1
        del buffer[:start]  # keep only the unfinished tail: O(one document) memory
        if remaining == 0:
            return


def batched(sequences: Iterable[torch.Tensor], batch_size: int) -> Iterator[torch.Tensor]:
    """Stack sequences (T,) into batches (B, T), B = batch_size except maybe the last one."""
    it = iter(sequences)
    while batch := list(islice(it, batch_size)):
        yield torch.stack(batch)  # (B, T)


def token_budget(max_sequences: int, context_size: int) -> int:
    """Tokens an extraction will process at most: the progress total (tokens)."""
    return max_sequences * context_size


class _Raised:
    def __init__(self, exc: BaseException):
        self.exc = exc


_END = object()


def prefetch(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """Iterate `items` on a background thread, at most `depth` items ahead of the consumer.

    On a GPU the forward is asynchronous, so tokenizing the next batches on another thread keeps
    that CPU work off the thread that launches the kernels. An exception raised while producing
    an item is raised here, at that item; closing the returned generator stops the thread.
    """
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(_END)
        except BaseException as exc:  # handed to the consumer
            put(_Raised(exc))

    threading.Thread(target=produce, name="prefetch", daemon=True).start()
    try:
        while (item := ready.get()) is not _END:
            if isinstance(item, _Raised):
                raise item.exc
            yield item
    finally:
        stop.set()
