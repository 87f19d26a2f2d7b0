"""Tiny but real Hugging Face causal LMs and tokenizers, built offline in a second or two.

Every builder writes what `save_pretrained` writes (config.json, generation_config.json,
model.safetensors) plus a byte-level BPE tokenizer trained in code, so `AutoTokenizer` and
`AutoModelForCausalLM` load the folders exactly like downloaded repos. Nothing is downloaded.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import random
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import safetensors.torch
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    FalconConfig,
    Gemma2Config,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    Olmo2Config,
    PhiConfig,
    PretrainedConfig,
    Qwen2Config,
)
from transformers.utils import logging as hf_logging

BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|endoftext|>"  # the name GPT-2 and Qwen use, so Qwen2Tokenizer adds none
BOS_ID = 0  # special tokens are trained first, so they get the first ids
EOS_ID = 1
VOCAB_SIZE = 384  # 256 byte symbols + 2 specials + 126 merges; a multiple of 128 for quantizers
MAX_POSITIONS = 256

ARCHES = ("llama", "gpt2", "gpt_neox", "qwen2", "phi")
# More layouts, for the hook-site tests: post-norm blocks (Gemma 2, OLMo-2), Falcon's parallel
# block that adds attention into the MLP output in place (7B layout, and 40B's new architecture).
MORE_ARCHES = ("gemma2", "olmo2", "falcon", "falcon_new", "mistral")
LLAMA_LIKE = frozenset({"llama", "qwen2", "gemma2", "mistral"})  # tokenizers that prepend BOS

_CORPUS = """\
The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun.
A language model reads a sequence of tokens and predicts the next token in the text.
Researchers study the residual stream of a transformer to find features that explain its behaviour.
Sparse autoencoders learn a dictionary of directions from the activations of one layer.
The model was trained on books, articles and conversations written in plain English.
Each layer adds the output of attention and of the feed forward block to the residual stream.
When the weather is fine we walk along the river and count the boats that pass by.
She opened the window, looked at the garden and said that the roses were in bloom again.
Numbers such as one, two, three, ten, twenty and one hundred appear in many sentences.
The library downloads the weights, checks their size and stores them in a local cache.
If the download stops in the middle of a file, the partial file should be removed.
Good tools report progress in bytes, show the speed and estimate the time that remains.
The tokenizer splits words into pieces, and common words become single tokens.
Tomorrow morning the train leaves the station at eight and arrives in the city at noon.
People ask questions, the assistant answers them, and the conversation goes on.
The history of science is a story of careful measurement and of surprising results.
"""


@functools.cache
def _trained_tokenizer_json() -> str:
    """Train the byte-level BPE once per process; returns it as JSON, without post-processor."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[BOS_TOKEN, EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS.splitlines() * 4, trainer=trainer)
    if tokenizer.get_vocab_size() != VOCAB_SIZE:  # the corpus must yield enough merges
        raise RuntimeError(f"tokenizer has {tokenizer.get_vocab_size()} tokens, not {VOCAB_SIZE}")
    return tokenizer.to_str()


def build_tokenizer(out_dir: Path, *, add_bos: bool) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into `out_dir`.

    With `add_bos` (Llama/Qwen-like) every encoding starts with BOS; without it (GPT-2-like)
    nothing is prepended. EOS exists in both; pad is left unset.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer.from_str(_trained_tokenizer_json())
    if add_bos:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{BOS_TOKEN} $A",
            pair=f"{BOS_TOKEN} $A {BOS_TOKEN}:1 $B:1",
            special_tokens=[(BOS_TOKEN, BOS_ID)],
        )
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "model_max_length": MAX_POSITIONS,
        "clean_up_tokenization_spaces": False,
    }
    _write_json(out_dir / "tokenizer_config.json", config)
    _write_json(out_dir / "special_tokens_map.json", special)


def _llama_config(layers: int, hidden: int) -> PretrainedConfig:
    return LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(4, hidden // 64),
        num_key_value_heads=max(4, hidden // 64),
        tie_word_embeddings=False,
    )


def _gpt2_config(layers: int, hidden: int) -> PretrainedConfig:
    return GPT2Config(
        n_embd=hidden, n_inner=2 * hidden, n_layer=layers, n_head=4, n_positions=MAX_POSITIONS
    )


def _gpt_neox_config(layers: int, hidden: int) -> PretrainedConfig:
    return GPTNeoXConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        use_parallel_residual=True,
        tie_word_embeddings=False,
    )


def _qwen2_config(layers: int, hidden: int) -> PretrainedConfig:
    return Qwen2Config(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        tie_word_embeddings=True,  # like Qwen2.5-0.5B: lm_head shares the embedding
    )


def _phi_config(layers: int, hidden: int) -> PretrainedConfig:
    return PhiConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
    )


def _gemma2_config(layers: int, hidden: int) -> PretrainedConfig:
    return Gemma2Config(  # head_dim × heads != hidden, like Gemma-2-2B (8 × 256 vs 2304)
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 2,
        sliding_window=8,
    )


def _olmo2_config(layers: int, hidden: int) -> PretrainedConfig:
    return Olmo2Config(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        tie_word_embeddings=False,
    )


def _falcon_config(layers: int, hidden: int) -> PretrainedConfig:
    return FalconConfig(  # Falcon-7B: parallel attention + MLP, multi-query attention
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        parallel_attn=True,
        multi_query=True,
        new_decoder_architecture=False,
        bias=False,
    )


def _falcon_new_config(layers: int, hidden: int) -> PretrainedConfig:
    return FalconConfig(  # Falcon-40B: two layernorms, grouped KV heads
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_kv_heads=2,
        new_decoder_architecture=True,
        bias=False,
    )


def _mistral_config(layers: int, hidden: int) -> PretrainedConfig:
    return MistralConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=None,
        tie_word_embeddings=False,
    )


_CONFIGS: dict[str, Callable[[int, int], PretrainedConfig]] = {
    "llama": _llama_config,
    "gpt2": _gpt2_config,
    "gpt_neox": _gpt_neox_config,
    "qwen2": _qwen2_config,
    "phi": _phi_config,
    "gemma2": _gemma2_config,
    "olmo2": _olmo2_config,
    "falcon": _falcon_config,
    "falcon_new": _falcon_new_config,
    "mistral": _mistral_config,
}


def tiny_config(arch: str, *, layers: int = 2, hidden: int = 128) -> PretrainedConfig:
    """Return the config of a tiny `arch` model whose vocab and special ids match our tokenizer."""
    if arch not in _CONFIGS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(_CONFIGS)}")
    config = _CONFIGS[arch](layers, hidden)
    config.vocab_size = VOCAB_SIZE
    config.bos_token_id = BOS_ID
    config.eos_token_id = EOS_ID
    if hasattr(config, "max_position_embeddings"):
        config.max_position_embeddings = MAX_POSITIONS
    return config


def _init_model(config: PretrainedConfig, seed: int, dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    return model.to(dtype).eval()


def build_tiny_model(
    arch: str,
    out_dir: Path,
    *,
    seed: int = 0,
    layers: int | None = None,
    hidden: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Save a seeded, randomly initialised `arch` model plus its tokenizer; returns out_dir.

    Defaults: 2 layers, hidden 128, 4 heads, intermediate 2×hidden, vocab 384, 256 positions.
    Writes config.json, generation_config.json, model.safetensors and the tokenizer files.
    """
    out_dir = Path(out_dir)
    config = tiny_config(arch, layers=layers or 2, hidden=hidden or 128)
    model = _init_model(config, seed, dtype)
    with _no_progress_bars():
        model.save_pretrained(out_dir)
    build_tokenizer(out_dir, add_bos=arch in LLAMA_LIKE)
    return out_dir


def build_pickle_only_repo(out_dir: Path, *, seed: int = 0) -> Path:
    """Save a tiny llama as config.json + pytorch_model.bin (a pickled state dict) + tokenizer.

    No safetensors file: the shape of old repos a loader must refuse by default. Returns out_dir.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = tiny_config("llama")
    model = _init_model(config, seed, torch.float32)
    config.save_pretrained(out_dir)
    model.generation_config.save_pretrained(out_dir)
    torch.save(model.state_dict(), out_dir / "pytorch_model.bin")
    build_tokenizer(out_dir, add_bos=True)
    return out_dir


def _add_distractors(repo_dir: Path, *, seed: int) -> None:
    """Add files a model downloader must skip: card, git attributes, pickle twin, ONNX export."""
    (repo_dir / "README.md").write_text(
        "---\nlicense: mit\nlibrary_name: transformers\npipeline_tag: text-generation\n---\n"
        "# tiny/llama\n\nA randomly initialised two-layer Llama for offline tests.\n"
    )
    (repo_dir / ".gitattributes").write_text(
        "".join(
            f"*.{ext} filter=lfs diff=lfs merge=lfs -text\n"
            for ext in ("safetensors", "bin", "onnx")
        )
    )
    state = safetensors.torch.load_file(repo_dir / "model.safetensors")
    torch.save(state, repo_dir / "pytorch_model.bin")
    (repo_dir / "onnx").mkdir(exist_ok=True)
    (repo_dir / "onnx" / "model.onnx").write_bytes(random.Random(seed).randbytes(256 * 1024))


def _write_catalogue(root: Path) -> dict[str, Path]:
    folders = {
        "tiny/llama": build_tiny_model("llama", root / "tiny--llama"),
        "tiny/gpt2": build_tiny_model("gpt2", root / "tiny--gpt2"),
        "tiny/gpt-neox": build_tiny_model("gpt_neox", root / "tiny--gpt-neox"),
        "tiny/qwen2": build_tiny_model("qwen2", root / "tiny--qwen2"),
        "tiny/phi": build_tiny_model("phi", root / "tiny--phi"),
        "tiny/gated-llama": build_tiny_model("llama", root / "tiny--gated-llama", seed=1),
        "tiny/pickle-only": build_pickle_only_repo(root / "tiny--pickle-only"),
        # ~22 MB of bf16 safetensors: a throttled download of it takes visible time
        "tiny/llama-big": build_tiny_model(
            "llama", root / "tiny--llama-big", layers=4, hidden=512, dtype=torch.bfloat16
        ),
    }
    _add_distractors(folders["tiny/llama"], seed=0)
    return folders


@functools.cache
def _cached_catalogue() -> dict[str, Path]:
    root = Path(tempfile.mkdtemp(prefix="mistudio-tiny-catalogue-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return _write_catalogue(root)


def build_catalogue(root: Path | None = None) -> dict[str, Path]:
    """Return repo_id → folder for the standard tiny repos (built once per process, then copied).

    With `root=None` the shared per-process folders are returned: treat them as read-only.
    With a `root`, each repo is copied to `root/<owner>--<name>` so a test may modify it.
    """
    source = _cached_catalogue()
    if root is None:
        return dict(source)
    root = Path(root)
    copies = {}
    for repo_id, folder in source.items():
        target = root / folder.name
        if not target.exists():
            shutil.copytree(folder, target)
        copies[repo_id] = target
    return copies


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """Silence transformers' "Writing model shards" bar; restore the caller's setting after."""
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")
