"""Tokenizers of three families with their real special tokens, trained offline in code.

- "llama": SentencePiece-style BPE (Metaspace `▁`, byte fallback), `<s>`/`</s>`, BOS added;
- "gpt2": byte-level BPE, `<|endoftext|>` is both BOS and EOS, nothing added;
- "chatml": byte-level BPE with Qwen2's `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`, no BOS;
- "sentencepiece": a Python (slow) tokenizer over a SentencePiece model (GPT-SW3's class), `<s>`,
  `<|endoftext|>`: no offsets, nothing added.
Each is saved with `save_pretrained` and loaded back with `AutoTokenizer`, like a downloaded one.
"""

from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path

import sentencepiece
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    AutoTokenizer,
    GPT2Tokenizer,
    GPTSw3Tokenizer,
    LlamaTokenizer,
    Qwen2Tokenizer,
)

from .tiny_models import _CORPUS

FAMILIES = ("llama", "gpt2", "chatml", "sentencepiece")
VOCAB_SIZE = 600
_SPECIALS = {
    "llama": ["<unk>", "<s>", "</s>"],
    "gpt2": ["<|endoftext|>"],
    "chatml": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
}


def _train(family: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) of a BPE trained on the tiny corpus with `family`'s pre-tokenizer."""
    bpe = Tokenizer(models.BPE())
    if family == "llama":  # words never merge across `▁`, as in a SentencePiece vocabulary
        bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        specials = [*_SPECIALS[family], *(f"<0x{b:02X}>" for b in range(256))]  # byte fallback
        alphabet = []
    else:
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        specials = _SPECIALS[family]
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE + (256 if family == "llama" else 0),
        special_tokens=specials,
        initial_alphabet=alphabet,
        show_progress=False,
    )
    bpe.train_from_iterator(_CORPUS.splitlines() * 4, trainer=trainer)
    data = json.loads(bpe.to_str())["model"]
    return data["vocab"], [tuple(m) for m in data["merges"]]


def _sentencepiece(out: Path):
    """A GPT-SW3-style tokenizer over a BPE SentencePiece model trained on the tiny corpus."""
    model = out / "spiece.model"
    with open(model, "wb") as fh:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(_CORPUS.splitlines() * 4), model_writer=fh, vocab_size=300,
            model_type="bpe", byte_fallback=True, unk_id=0, pad_id=1, bos_id=2, eos_id=3,
            minloglevel=2,
        )  # fmt: skip
    return GPTSw3Tokenizer(vocab_file=str(model), name_or_path="tiny-sentencepiece")


def _build(family: str, out: Path):
    if family == "sentencepiece":
        return _sentencepiece(out)
    vocab, merges = _train(family)
    if family == "llama":
        tok = LlamaTokenizer(vocab=vocab, merges=merges, legacy=False, add_bos_token=True)
    elif family == "gpt2":
        tok = GPT2Tokenizer(vocab=vocab, merges=merges)
    else:
        tok = Qwen2Tokenizer(
            vocab=vocab, merges=merges, additional_special_tokens=_SPECIALS[family][1:]
        )
    tok.model_max_length = 4096
    return tok


@functools.cache
def text_tokenizer_dir(family: str) -> Path:
    """A folder holding `family`'s tokenizer files (built once per process)."""
    out = Path(tempfile.mkdtemp(prefix=f"mistudio-tok-{family}-"))
    _build(family, out).save_pretrained(out)
    return out


def text_tokenizer(family: str):
    """`family`'s tokenizer, loaded from its folder by AutoTokenizer."""
    return AutoTokenizer.from_pretrained(text_tokenizer_dir(family))
