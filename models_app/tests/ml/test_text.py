"""What the text holds: special-token strings under both policies, and documents too long to hold.

Tokenizers of four kinds (Llama SentencePiece-style with BOS added, GPT-2 byte-level with
`<|endoftext|>`, ChatML/Qwen2 with `<|im_start|>`, and a Python (slow) SentencePiece tokenizer,
which has no offsets), each checked against its own encoding of the whole text, the independent
reference.
"""

from __future__ import annotations

import random
from itertools import chain
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from mistudio.testing.text_tokenizers import FAMILIES, text_tokenizer
from mistudio.testing.tiny_models import _CORPUS, tiny_config
from models_app.ml.extract import ExtractionError, ExtractionSpec, run_extraction
from models_app.ml.tokens import adds_bos, iter_document_ids, pack_documents

from .conftest import assert_rel_close, hidden_states

# a model for each tokenizer
ARCH = {"llama": "llama", "gpt2": "gpt2", "chatml": "qwen2", "sentencepiece": "gpt2"}
CHAT = {
    "llama": "<s>User: {q}</s>Assistant: {a}</s>",
    "gpt2": "<|endoftext|>Question: {q}\nAnswer: {a}<|endoftext|>",
    "chatml": "<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n{a}<|im_end|>",
    "sentencepiece": "<s>User: {q}\nBot: {a}<|endoftext|>",
}
PIECES = [
    *_CORPUS.split(),
    *("é", "😀", "日本語のテキスト", "  ", "\n\n", "\t", "x" * 70, "1234567", "   indented"),
    *("<s>", "</s>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "don't", "‘quoted’", "\n"),
]


@pytest.fixture(scope="module")
def toks():
    return {family: text_tokenizer(family) for family in FAMILIES}


def _chat(family: str, n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = _CORPUS.split()
    say = lambda: " ".join(rng.choice(words) for _ in range(rng.randint(2, 12)))  # noqa: E731
    return [CHAT[family].format(q=say(), a=say()) for _ in range(n)]


def _messy(rng: random.Random, n_pieces: int) -> str:
    seps = (" ", " ", " ", "", "\n", "  ")
    return "".join(rng.choice(PIECES) + rng.choice(seps) for _ in range(n_pieces))


def _own_ids(tok, text: str, policy: str) -> list[int]:
    """The tokenizer's own encoding of the whole text (no special tokens added)."""
    return tok(text, add_special_tokens=False, split_special_tokens=policy == "text")["input_ids"]


def reference_sequences(tok, docs: list[str], context: int, policy: str) -> list[list[int]]:
    """The documented packing, built from the tokenizer's own encoding of each whole document:
    EOS between documents unless one is already there; with a BOS-adding tokenizer, BOS then
    context - 1 stream tokens, a stream BOS at that place taking the place of ours."""
    eos, bos = tok.eos_token_id, tok.bos_token_id if adds_bos(tok) else None
    stream: list[int] = []
    for doc in docs:
        ids = _own_ids(tok, doc, policy)
        if stream and stream[-1] != eos and ids[0] != eos:
            stream.append(eos)
        stream += ids
    out, pos = [], 0
    body = context - (bos is not None)
    while True:
        if bos is not None and pos < len(stream) and stream[pos] == bos:
            pos += 1
        if len(stream) - pos < body:
            return out
        out.append(([bos] if bos is not None else []) + stream[pos : pos + body])
        pos += body


def _specials(tok) -> set[int]:
    return set(tok.all_special_ids)


# ---------------------------------------------------------------------------------------------
# Special-token strings


@pytest.mark.parametrize("family", FAMILIES)
def test_by_default_special_token_strings_are_plain_text(toks, family):
    tok = toks[family]
    docs = _chat(family, 30)
    seqs = torch.stack(list(pack_documents(tok, docs, 32)))  # (N, 32)
    assert seqs.tolist() == reference_sequences(tok, docs, 32, "text")
    # Only our own BOS (position 0) and EOS (one between documents) appear.
    eos = tok.eos_token_id
    body = seqs[:, 1:] if adds_bos(tok) else seqs
    if adds_bos(tok):
        assert (seqs[:, 0] == tok.bos_token_id).all()
        assert not (body == tok.bos_token_id).any()
    others = _specials(tok) - {eos, tok.bos_token_id if adds_bos(tok) else eos}
    assert not any(i in others for i in seqs.flatten().tolist())
    # One EOS per document boundary: the documents hold none of their own.
    plain = [_own_ids(tok, d, "text") for d in docs]
    assert all(eos not in ids for ids in plain)
    n_stream = body.numel()
    boundaries = sum(1 for k in range(1, len(plain)) if sum(map(len, plain[:k])) + k - 1 < n_stream)
    assert int((body == eos).sum()) == boundaries


@pytest.mark.parametrize("family", FAMILIES)
def test_parse_reads_special_tokens_and_never_doubles_bos(toks, family):
    tok = toks[family]
    docs = _chat(family, 30, seed=1)
    seqs = torch.stack(list(pack_documents(tok, docs, 32, special_tokens="parse")))
    assert seqs.tolist() == reference_sequences(tok, docs, 32, "parse")
    flat = seqs.flatten().tolist()
    vocab = tok.get_vocab()
    markers = {
        "llama": ["<s>", "</s>"],
        "gpt2": ["<|endoftext|>"],
        "chatml": ["<|im_start|>", "<|im_end|>"],
        "sentencepiece": ["<s>", "<|endoftext|>"],
    }
    for name in markers[family]:
        assert vocab[name] in flat  # the chat markers are their special tokens
    if adds_bos(tok):
        bos = tok.bos_token_id
        assert (seqs[:, 0] == bos).all()
        assert not (seqs[:, 1] == bos).any()  # never [BOS, BOS]
        pairs = zip(flat, flat[1:], strict=False)
        assert not any(a == b == bos for a, b in pairs)
        assert (seqs[:, 1:] == bos).any()  # the data's own BOS, where a document starts


def test_a_document_starting_with_bos_gets_no_second_bos(toks):
    tok = toks["llama"]
    bos, eos = tok.bos_token_id, tok.eos_token_id
    docs = ["<s>User: the fox</s>", "<s>Assistant: the dog</s>"]
    first = _own_ids(tok, docs[0], "parse")
    second = _own_ids(tok, docs[1], "parse")
    assert first[0] == bos and first[-1] == eos and second[0] == bos
    n = len(first) + len(second)
    (seq,) = pack_documents(tok, docs, n, special_tokens="parse")
    # BOS at position 0 is the data's own; the first document's EOS separates, none is added
    assert seq.tolist() == first + second


@pytest.mark.parametrize("policy", ["text", "parse"])
@pytest.mark.parametrize("family", FAMILIES)
def test_the_extraction_writes_the_tokenizers_ids_and_records_the_policy(
    toks, tmp_path, family, policy
):
    tok = toks[family]
    config = tiny_config(ARCH[family], layers=3, hidden=64)  # layer 1 is not the last
    config.vocab_size = len(tok)
    config.bos_token_id, config.eos_token_id = tok.bos_token_id, tok.eos_token_id
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    docs = _chat(family, 40, seed=2)
    spec = ExtractionSpec(
        layers=[1], hook_types=["residual"], context_size=24, batch_size=4, max_samples=9,
        special_tokens=policy,
    )  # fmt: skip
    manifest = run_extraction(model, tok, iter(docs), spec, tmp_path, meta={})
    assert manifest["special_tokens"] == policy and manifest["spec"]["special_tokens"] == policy
    (hook,) = manifest["hooks"]
    shards = [load_file(Path(tmp_path) / s["file"]) for s in hook["shards"]]
    ids = torch.cat([s["token_ids"] for s in shards]).long()  # (9, 24)
    assert ids.tolist() == reference_sequences(tok, docs, 24, policy)[:9]
    acts = torch.cat([s["activations"] for s in shards])
    assert_rel_close(acts, hidden_states(model, ids)[2])


def test_an_unknown_policy_is_refused(toks, tmp_path):
    spec = ExtractionSpec(
        layers=[0], hook_types=["residual"], context_size=8, batch_size=1, max_samples=1,
        special_tokens="maybe",
    )  # fmt: skip
    config = tiny_config("gpt2", layers=1, hidden=64)
    model = AutoModelForCausalLM.from_config(config).eval()
    with pytest.raises(ExtractionError, match="special_tokens must be one of text, parse"):
        run_extraction(model, toks["gpt2"], ["a b c"], spec, tmp_path / "x", meta={})
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())


# ---------------------------------------------------------------------------------------------
# Long documents: tokenized a window at a time, the same ids as the whole text


@pytest.mark.parametrize("policy", ["text", "parse"])
@pytest.mark.parametrize("family", FAMILIES)
def test_a_document_in_pieces_gets_the_ids_of_the_whole_text(toks, family, policy):
    tok = toks[family]
    rng = random.Random(hash((family, policy)) % 1000)
    for _ in range(12):
        text = _messy(rng, rng.randint(100, 600))
        whole = _own_ids(tok, text, policy)
        for window in (40, 101, 333):
            cuts = sorted(rng.sample(range(1, len(text)), 20))  # pieces of random lengths
            pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
            for doc in (iter(pieces), text):  # pieces, or one str longer than the window
                parts = iter_document_ids(tok, [doc], policy, window)
                got = list(chain.from_iterable(ids for _, ids in parts))
                assert got == whole, (family, policy, window, text)


@pytest.mark.parametrize("family", FAMILIES)
def test_words_longer_than_the_window_still_match(toks, family):
    tok = toks[family]
    text = "start " + "abcdefghij" * 300 + " middle " + "日本語" * 200 + " end"
    whole = _own_ids(tok, text, "text")
    got = list(chain.from_iterable(ids for _, ids in iter_document_ids(tok, [text], "text", 97)))
    assert got == whole


@pytest.mark.parametrize("family", FAMILIES)
def test_long_and_short_documents_pack_like_whole_documents(toks, family):
    tok = toks[family]
    rng = random.Random(7)
    docs = [_messy(rng, rng.choice([5, 40, 900])) for _ in range(12)]
    want = reference_sequences(tok, docs, 32, "text")
    pieces = [iter([d[i : i + 50] for i in range(0, len(d), 50)]) for d in docs]
    got = torch.stack(list(pack_documents(tok, pieces, 32, window=120))).tolist()
    assert got == want


def test_only_the_text_the_job_needs_is_read(toks):
    tok = toks["llama"]
    read = 0

    def endless():  # a document that never ends: reading must stop by itself
        nonlocal read
        while True:
            piece = "the quick brown fox jumps over the lazy dog " * 100
            read += len(piece)
            yield piece

    seqs = list(pack_documents(tok, [endless(), "never reached"], 64, 50, window=4096))
    assert len(seqs) == 50
    assert read < 50 * 64 * 10 + 3 * 4096  # a few characters per token, plus a window
