"""Token pipeline: the model's own tokenizer, documents packed into fixed-length sequences.

Packing (no padding, so no padded positions hold garbage activations):
    [BOS] doc1 tokens … EOS doc2 tokens … EOS doc3 …      cut every `context_size` tokens
- EOS separates consecutive documents (unless the boundary already holds the data's own EOS);
- when the tokenizer adds a BOS of its own, every sequence starts with BOS at position 0 and carries
  `context_size - 1` stream tokens (a document cut at a boundary goes on after the next BOS); a
  sequence whose stream part would start with the data's own BOS takes that one: never two BOS;
- the last partial sequence is dropped.

Special-token strings in the data (`<s>`, `<|endoftext|>`, `<|im_start|>` …): a policy per
extraction.
- "text" (default): they are plain text, tokenized like any other characters
  (`split_special_tokens=True`), so the only BOS/EOS ids in a sequence are the ones packing puts;
- "parse": they become the special tokens (chat-formatted data); BOS is still never doubled.

Documents are `str`, or an iterable of `str` pieces for texts too long to hold (a 300 MB line):
those are tokenized window by window (`WINDOW_CHARS`) with the same ids as the whole text gets
(see `_stream_ids`), and only as many pieces are read as the packed sequences need.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from itertools import islice
from typing import TypeVar

import torch

T = TypeVar("T")
Document = str | Iterable[str]  # a text, or its pieces in order
PROBE_TEXT = "Hello world"
ENCODE_CHUNK = 64  # documents tokenized per call: batch speed without holding the dataset
WINDOW_CHARS = 65536  # characters tokenized per call within one long document
LEAD_CHARS = 256  # already-tokenized text put before a window so it starts mid-document
TAIL_TOKENS = 8  # tokens held back at a window's end: the text after it may change them
GROW_MAX = 16  # a window without a word start grows up to this many times its size
SPECIAL_TOKENS = ("text", "parse")  # policy for special-token strings found in the data
DEFAULT_SPECIAL_TOKENS = "text"


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


def special_tokens_check(policy: str) -> str:
    """`policy` when it is one of SPECIAL_TOKENS; ValueError naming the choices otherwise."""
    if policy not in SPECIAL_TOKENS:
        raise ValueError(
            f"special_tokens must be one of {', '.join(SPECIAL_TOKENS)}, not {policy!r}"
        )
    return policy


def _encode(tokenizer, texts, split: bool, offsets: bool = False) -> dict:
    # split_special_tokens is passed on every call: the backend keeps the last value it was given.
    return tokenizer(
        texts,
        add_special_tokens=False,
        split_special_tokens=split,
        return_offsets_mapping=offsets,
    )


def _slices(text: str, size: int) -> Iterator[str]:
    return (text[i : i + size] for i in range(0, len(text), size))


def iter_document_ids(
    tokenizer,
    texts: Iterable[Document],
    special_tokens: str = DEFAULT_SPECIAL_TOKENS,
    window: int = WINDOW_CHARS,
) -> Iterator[tuple[bool, list[int]]]:
    """(starts_a_document, ids) of every non-empty document, without added special tokens.

    Short texts are tokenized ENCODE_CHUNK at a time; a text longer than `window` characters, or
    one given as pieces, comes in several parts (only the first starts the document), read and
    tokenized a window at a time. Raises ValueError for an unknown special_tokens policy.
    """
    split = special_tokens_check(special_tokens) == "text"
    batch: list[str] = []
    for doc in texts:
        if isinstance(doc, str) and len(doc) <= window:
            if doc:
                batch.append(doc)
            if len(batch) < ENCODE_CHUNK:
                continue
            ids_list, batch = _encode(tokenizer, batch, split)["input_ids"], []
            yield from ((True, ids) for ids in ids_list if ids)
            continue
        if batch:
            ids_list, batch = _encode(tokenizer, batch, split)["input_ids"], []
            yield from ((True, ids) for ids in ids_list if ids)
        pieces = _slices(doc, window) if isinstance(doc, str) else doc
        first = True
        for ids in _stream_ids(tokenizer, pieces, split, window):
            yield first, ids
            first = False
    if batch:
        yield from ((True, ids) for ids in _encode(tokenizer, batch, split)["input_ids"] if ids)


def _stream_ids(tokenizer, pieces: Iterable[str], split: bool, window: int) -> Iterator[list[int]]:
    """Non-empty lists of the ids of the text made of `pieces`, a window at a time.

    Each window is tokenized after LEAD_CHARS of the text before it (their tokens are dropped), so
    it is read as the middle of a document (no prefix space of its own). The tokens after the
    window's last word start (a whitespace after a non-whitespace character), which the text that
    follows could still change, are held back and tokenized again with the next window; a window
    without a word start is doubled, up to GROW_MAX times its size, and past that TAIL_TOKENS are
    held back. So the ids equal those of the whole text whenever the tokenizer does not merge
    across a word start (byte-level BPE, SentencePiece vocabularies) and words are shorter than
    GROW_MAX windows. Holds at most one piece plus GROW_MAX windows.
    """
    it = iter(pieces)
    lead, buf, exhausted, size = "", "", False, window
    while True:
        while not exhausted and len(buf) < size:
            piece = next(it, None)
            exhausted = piece is None
            buf += piece or ""
        if not buf:
            return
        final = exhausted and len(buf) <= size
        chunk = buf if final else buf[:size]
        got = _window_ids(tokenizer, lead, chunk, split, final, size >= GROW_MAX * window)
        if got is None:  # no word start in this window: read a longer one
            size *= 2
            continue
        ids, used = got
        if ids:
            yield ids
        if final:
            return
        lead, buf, size = (lead + chunk[:used])[-LEAD_CHARS:], buf[used:], window


def _window_ids(tokenizer, lead: str, chunk: str, split: bool, final: bool, last_resort: bool):
    """(ids of `chunk` read after `lead`, characters of `chunk` they cover), or None when the
    chunk has no boundary to stop at (and `last_resort` is false)."""
    text = lead + chunk
    enc = _encode(tokenizer, text, split, offsets=True)
    if "offset_mapping" not in enc:  # a Python (slow) tokenizer has no offsets
        return _window_ids_by_prefix(tokenizer, lead, chunk, split, final, last_resort)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    start = len(lead)
    first = next((i for i, (s, _) in enumerate(offsets) if s >= start), len(ids))
    if final:
        return ids[first:], len(chunk)
    limit = _last_word_start(text, start)
    end = 0 if limit is None else _emit_count(offsets, first, limit)
    if end <= first and last_resort:
        end = _emit_count(offsets, first, None)
        if end <= first:
            return ids[first:], len(chunk)
    if end <= first:
        return None
    return ids[first:end], offsets[end - 1][1] - start


def _window_ids_by_prefix(tokenizer, lead: str, chunk: str, split: bool, final, last_resort):
    """_window_ids without offsets: the chunk is cut at its last word start, and the ids of `lead`
    alone (which ends at a word start too) are dropped from those of lead + the cut chunk."""
    cut = len(chunk) if final else _last_word_start(chunk, 0)
    if not cut:
        if not last_resort:
            return None
        cut = len(chunk)
    lead_ids = _encode(tokenizer, lead, split)["input_ids"] if lead else []
    ids = _encode(tokenizer, lead + chunk[:cut], split)["input_ids"]
    return ids[len(lead_ids) :], cut


def _emit_count(offsets: list, first: int, limit: int | None) -> int:
    """How many tokens to emit: up to a clean boundary (no character shared by two tokens) at or
    before `limit` (a word start), or TAIL_TOKENS before the end when limit is None; at least the
    last token is held back. 0 when no such boundary lies past `first`."""
    n = len(offsets)
    top = n - 1 if limit is not None else n - TAIL_TOKENS
    for end in range(top, first, -1):
        stop = offsets[end - 1][1]
        if stop <= offsets[end][0] and (limit is None or stop <= limit):
            return end
    return 0


def _last_word_start(text: str, start: int) -> int | None:
    """Index of the last whitespace character that follows a non-whitespace one, past `start`."""
    for i in range(len(text) - 1, start, -1):
        if text[i].isspace() and not text[i - 1].isspace():
            return i
    return None


def _eos_id(tokenizer) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token to separate documents")
    return int(eos)


def _token_stream(
    tokenizer, texts: Iterable[Document], special_tokens: str, window: int
) -> Iterator[list[int]]:
    """Documents' ids with EOS between consecutive documents (a separator, not a terminator),
    except where the data already puts one there (with special_tokens="parse")."""
    eos = _eos_id(tokenizer)
    last = None  # the last id of the stream so far
    for starts, ids in iter_document_ids(tokenizer, texts, special_tokens, window):
        if starts and last is not None and last != eos and ids[0] != eos:
            ids = [eos, *ids]
        yield ids
        last = ids[-1]


def pack_documents(
    tokenizer,
    texts: Iterable[Document],
    context_size: int,
    max_sequences: int | None = None,
    *,
    special_tokens: str = DEFAULT_SPECIAL_TOKENS,
    window: int = WINDOW_CHARS,
) -> Iterator[torch.Tensor]:
    """Yield int64 tensors of shape (context_size,), streaming: at most one window is held.

    Stops after `max_sequences` sequences (reading no more text than they need), or when the
    texts run out (the last partial sequence is dropped). Raises ValueError when context_size is
    too small, the tokenizer has no EOS, or the special_tokens policy is unknown.
    """
    special_tokens_check(special_tokens)
    bos = int(tokenizer.bos_token_id) if adds_bos(tokenizer) else None
    prefix = [] if bos is None else [bos]
    body = context_size - len(prefix)
    if body < 1:
        raise ValueError(f"context_size {context_size} leaves no room for tokens after BOS")
    remaining = max_sequences  # None: until the texts run out
    buffer: list[int] = []
    fresh = True  # the stream's next token starts a sequence: a BOS there is position 0 itself
    stream = _token_stream(tokenizer, texts, special_tokens, window) if remaining != 0 else ()
    for ids in stream:
        buffer.extend(ids)
        start = 0
        while True:
            if fresh and bos is not None and start < len(buffer):
                if buffer[start] == bos:
                    start += 1  # the data's own BOS is position 0: not doubled
                fresh = False
            if len(buffer) - start < body:
                break
            yield torch.tensor(prefix + buffer[start : start + body], dtype=torch.long)
            start += body
            fresh = True
            remaining = None if remaining is None else remaining - 1
            if remaining == 0:
                return
        del buffer[:start]  # keep only the unfinished tail: O(one window) memory


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
