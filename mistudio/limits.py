"""Bounds shared by every extraction setting, wherever it comes from (modal, API, CLI, template
import). One place, so there are never two different batch-size rules."""

from __future__ import annotations

# Per-layer sites (named as the seed did; TransformerLens names in comments) and the final norm.
HOOK_TYPES = ("residual", "mlp", "attention", "resid_pre", "z", "ln_final")
HOOK_LABELS = {
    "residual": "Residual Stream",  # blocks.{i}.hook_resid_post
    "mlp": "MLP Output",  # blocks.{i}.hook_mlp_out
    "attention": "Attention Output",  # blocks.{i}.hook_attn_out
    "resid_pre": "Block Input",  # blocks.{i}.hook_resid_pre
    "z": "Attention Heads (z)",  # blocks.{i}.attn.hook_z
    "ln_final": "Final Norm Output",  # ln_final.hook_normalized
}
MODULE_SITES_MAX = 16  # advanced: module paths read as they are, per job
MODULE_PATH_MAX = 300
MODULE_IO = ("output", "input")
# Special-token strings found in a dataset's text (`<s>`, `<|im_start|>` …): plain text, or parsed
# as the special tokens (chat-formatted data). Same values as models_app.ml.tokens.SPECIAL_TOKENS.
SPECIAL_TOKENS = ("text", "parse")
SPECIAL_TOKENS_LABELS = {
    "text": "Plain text: only our own BOS/EOS ids appear",
    "parse": "Special tokens: for chat-formatted data",
}
DEFAULT_SPECIAL_TOKENS = "text"
# What an extraction writes: the safetensors shards (always, the source of truth), and with
# "safetensors+saelens" also, at the end of the same job, the `datasets` folder SAELens trains from.
OUTPUT_FORMATS = ("safetensors", "safetensors+saelens")
OUTPUT_FORMAT_LABELS = {
    "safetensors": "Safetensors shards",
    "safetensors+saelens": "Safetensors shards + a SAELens-ready datasets folder",
}
DEFAULT_OUTPUT_FORMAT = "safetensors"

LAYER_INDEX_MAX = 1023  # no released decoder has more blocks; the model bound is checked on use
LAYERS_PER_JOB_MAX = 256
BATCH_SIZE_MIN, BATCH_SIZE_MAX = 1, 1024
MAX_SAMPLES_MIN, MAX_SAMPLES_MAX = 1, 100_000_000
CONTEXT_SIZE_MIN, CONTEXT_SIZE_MAX = 2, 131_072
TOP_K_MIN, TOP_K_MAX = 1, 10_000

DEFAULT_BATCH_SIZE = 32
DEFAULT_MAX_SAMPLES = 1000
DEFAULT_CONTEXT_SIZE = 128
DEFAULT_TOP_K = 100

NAME_MAX = 255
DESCRIPTION_MAX = 500
