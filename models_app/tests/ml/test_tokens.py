"""Token pipeline: the model's own tokenizer, documents packed without padding."""

from __future__ import annotations

import itertools
import threading

import pytest
import torch

from models_app.ml.tokens import (
    ENCODE_CHUNK,
    adds_bos,
    batched,
    bos_policy,
    pack_documents,
    prefetch,
    token_budget,
)

from .conftest import corpus

BOS, EOS = 0, 1  # ids of the tiny tokenizers' special tokens


def _stream(tokenizer, texts: list[str]) -> list[int]:
    """Expected token stream, built independently: documents joined by EOS."""
    out: list[int] = []
    for i, text in enumerate(texts):
        out += ([EOS] if i else []) + tokenizer.encode(text, add_special_tokens=False)
    return out


def test_it_detects_whether_the_tokenizer_adds_bos(tiny):
    _, llama_tok = tiny("llama")
    _, gpt2_tok = tiny("gpt2")
    assert adds_bos(llama_tok) and bos_policy(llama_tok) == "bos_at_position_0"
    assert not adds_bos(gpt2_tok) and bos_policy(gpt2_tok) == "no_bos"


def test_with_bos_every_sequence_starts_with_bos_then_the_stream(tiny):
    _, tok = tiny("llama")
    texts = list(corpus(40))
    seqs = list(pack_documents(tok, texts, context_size=16))
    stream = _stream(tok, texts)
    assert len(seqs) == len(stream) // 15  # the last partial sequence is dropped
    for k, seq in enumerate(seqs):
        assert seq.dtype == torch.long and seq.shape == (16,)
        assert seq[0] == BOS
        assert seq[1:].tolist() == stream[15 * k : 15 * (k + 1)]


def test_without_bos_sequences_are_plain_cuts_of_the_stream(tiny):
    _, tok = tiny("gpt2")
    texts = list(corpus(40, seed=3))
    seqs = torch.stack(list(pack_documents(tok, texts, context_size=16)))  # (N, 16)
    stream = _stream(tok, texts)
    assert seqs.flatten().tolist() == stream[: seqs.numel()]
    assert len(stream) - seqs.numel() < 16
    assert (seqs == EOS).sum() >= 1  # documents are separated
    assert (seqs == BOS).sum() == 0


def test_there_is_no_padding_and_eos_only_separates_documents(tiny):
    _, tok = tiny("gpt2")
    texts = ["one two three", "four five"]
    (seq,) = pack_documents(tok, texts * 4, context_size=len(_stream(tok, texts * 4)))
    assert seq.tolist() == _stream(tok, texts * 4)  # no EOS before the first or after the last
    assert tok.pad_token_id is None or tok.pad_token_id not in seq.tolist()


def test_max_sequences_stops_early_and_reads_the_texts_lazily(tiny):
    _, tok = tiny("llama")
    consumed = itertools.count()

    def texts():
        for text in corpus(100_000):
            next(consumed)
            yield text

    seqs = list(pack_documents(tok, texts(), context_size=8, max_sequences=3))
    assert len(seqs) == 3
    assert next(consumed) <= ENCODE_CHUNK  # one chunk was tokenized, not the dataset


def test_empty_documents_are_skipped_and_do_not_end_the_stream(tiny):
    _, tok = tiny("gpt2")
    texts = [""] * (3 * ENCODE_CHUNK) + ["river garden train"] * 20
    seqs = list(pack_documents(tok, texts, context_size=4))
    assert seqs and all(len(s) == 4 for s in seqs)
    assert list(pack_documents(tok, [], context_size=4)) == []


def test_max_sequences_zero_yields_nothing(tiny):
    _, tok = tiny("gpt2")
    assert list(pack_documents(tok, corpus(10), context_size=4, max_sequences=0)) == []


def test_context_size_must_leave_room_after_bos(tiny):
    _, tok = tiny("qwen2")
    with pytest.raises(ValueError, match="no room"):
        next(pack_documents(tok, corpus(3), context_size=1))


def test_batched_stacks_sequences_and_keeps_a_short_last_batch():
    seqs = [torch.full((5,), i) for i in range(7)]
    shapes = [b.shape for b in batched(seqs, 3)]
    assert shapes == [(3, 5), (3, 5), (1, 5)]
    assert token_budget(10, 128) == 1280


def test_prefetch_yields_every_item_in_order_and_raises_where_the_source_did():
    def source():
        yield from range(5)
        raise ValueError("bad document")

    seen = []
    with pytest.raises(ValueError, match="bad document"):
        for item in prefetch(source(), depth=2):
            seen.append(item)
    assert seen == [0, 1, 2, 3, 4]


def test_closing_a_prefetch_stops_its_thread():
    produced = []

    def source():
        for i in range(1000):
            produced.append(i)
            yield i

    items = prefetch(source(), depth=1)
    assert next(items) == 0
    items.close()
    for thread in [t for t in threading.enumerate() if t.name == "prefetch"]:
        thread.join(timeout=10)
        assert not thread.is_alive()
    assert len(produced) < 10  # the thread stopped instead of running through the source
