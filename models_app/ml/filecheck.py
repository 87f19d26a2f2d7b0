"""Check a snapshot's files before transformers reads them, so a hostile or broken file ends the
job at once with a message that names it (instead of a native allocation of 2^62 bytes that
takes the worker down, or a type error deep inside a tokenizer).

Reads headers and small JSON files only, in bounded memory: a safetensors header is at most
HEADER_MAX bytes, every tensor's byte range must lie inside the file and agree with its dtype and
shape, and the data must end where the file ends (no trailing bytes). The JSON support files
must be JSON objects, and tokenizer_config.json's well-known fields must have their types.
No Django here.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path

from mistudio.jsonparse import json_loads  # plain Python, no Django

from .configs import ConfigError

HEADER_MAX = 100 * 1024 * 1024  # safetensors' own limit on the JSON header
JSON_FILE_MAX = 64 * 1024 * 1024  # tokenizer.json of a 256k vocabulary is ~35 MB
JSON_DEPTH_MAX = 128
DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "U16": 2, "I16": 2,
    "F16": 2, "BF16": 2, "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8,
    "F4": 0.5, "F6_E2M3": 0.75, "F6_E3M2": 0.75, "C64": 8,
}  # fmt: skip
TOKEN_FIELDS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token",
                "mask_token")  # fmt: skip
BOOL_FIELDS = ("add_bos_token", "add_eos_token", "add_prefix_space", "clean_up_tokenization_spaces",
               "do_lower_case", "legacy", "use_fast")  # fmt: skip
INT_FIELDS = ("model_max_length",)
STR_FIELDS = ("tokenizer_class", "padding_side", "truncation_side", "chat_template")


class FileCheckError(ConfigError):
    """A file of the snapshot miStudio will not hand to transformers; the message names it."""


def _bad(name: str, why: str) -> FileCheckError:
    return FileCheckError(f"{name} is not a valid file: {why}.")


def _json(path: Path, name: str, limit: int = JSON_FILE_MAX) -> object:
    size = path.stat().st_size
    if size > limit:
        raise _bad(name, f"{size:,} bytes, more than {limit:,}")
    try:
        return json_loads(path.read_bytes(), max_depth=JSON_DEPTH_MAX)
    except ValueError as exc:
        raise _bad(name, f"not JSON we read ({exc})") from None


def safetensors_check(path: Path, name: str | None = None) -> int:
    """Check one .safetensors file's header against its size; return its tensor count.
    FileCheckError naming the file otherwise."""
    name = name or path.name
    size = path.stat().st_size
    with path.open("rb") as fh:
        prefix = fh.read(8)
        if len(prefix) < 8:
            raise _bad(name, "shorter than a safetensors header")
        (length,) = struct.unpack("<Q", prefix)
        if not 2 <= length <= min(HEADER_MAX, size - 8):
            raise _bad(name, f"its header claims {length:,} bytes in a {size:,}-byte file")
        raw = fh.read(length)
    try:
        header = json_loads(raw.rstrip(b" "), max_depth=8)
    except ValueError as exc:
        raise _bad(name, f"its header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise _bad(name, "its header is not a JSON object")
    data_size, end_max, ranges = size - 8 - length, 0, []
    for key, tensor in header.items():
        if key == "__metadata__":
            if not isinstance(tensor, dict) or not all(isinstance(v, str) for v in tensor.values()):
                raise _bad(name, "__metadata__ is not a map of strings")
            continue
        begin, end = _tensor_range(name, key, tensor)
        if end > data_size:
            raise _bad(name, f"tensor {key[:80]} lies past the end of the file")
        ranges.append((begin, end))
        end_max = max(end_max, end)
    ranges.sort()
    for (_, end_a), (begin_b, _) in zip(ranges, ranges[1:], strict=False):
        if begin_b < end_a:
            raise _bad(name, "two tensors overlap")
    if end_max != data_size:
        raise _bad(name, f"{data_size - end_max:,} bytes follow the last tensor")
    return len(ranges)


def _tensor_range(name: str, key: str, tensor: object) -> tuple[int, int]:
    if not isinstance(tensor, dict):
        raise _bad(name, f"tensor {key[:80]} is not described by an object")
    dtype, shape, offsets = tensor.get("dtype"), tensor.get("shape"), tensor.get("data_offsets")
    if dtype not in DTYPE_BYTES:
        raise _bad(name, f"tensor {key[:80]} has an unknown dtype {str(dtype)[:20]!r}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise _bad(name, f"tensor {key[:80]} has no valid shape")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise _bad(name, f"tensor {key[:80]} has no valid byte range")
    expected = math.prod(shape) * DTYPE_BYTES[dtype]
    if offsets[1] - offsets[0] != expected:
        raise _bad(name, f"tensor {key[:80]} holds {offsets[1] - offsets[0]:,} bytes, its shape"
                   f" needs {math.ceil(expected):,}")  # fmt: skip
    return offsets[0], offsets[1]


def tokenizer_config_check(config: object, name: str = "tokenizer_config.json") -> None:
    """FileCheckError when a well-known field of tokenizer_config.json has the wrong type."""
    if not isinstance(config, dict):
        raise _bad(name, "not a JSON object")
    for field in TOKEN_FIELDS:
        value = config.get(field)
        if value is None or isinstance(value, str):
            continue
        if not (isinstance(value, dict) and isinstance(value.get("content"), str)):
            raise _bad(name, f"{field} is neither a string nor a token object")
    for fields, kind, label in ((BOOL_FIELDS, bool, "true or false"),
                                (INT_FIELDS, int | float, "a number"),
                                (STR_FIELDS, str, "a string")):  # fmt: skip
        for field in fields:
            value = config.get(field)
            if value is None:
                continue
            ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
            if field == "chat_template" and isinstance(value, list):
                ok = True  # a list of named templates
            if not ok:
                raise _bad(name, f"{field} must be {label}")
    added = config.get("added_tokens_decoder")
    if added is not None and not isinstance(added, dict):
        raise _bad(name, "added_tokens_decoder is not an object")


def snapshot_check(folder: Path) -> None:
    """Check every file transformers will read in `folder`: safetensors headers, the JSON
    support files, tokenizer_config.json's field types. FileCheckError names the first bad
    file."""
    folder = Path(folder)
    for path in sorted(folder.glob("*.safetensors")):
        safetensors_check(path)
    for path in sorted(folder.glob("*.json")):
        data = _json(path, path.name)
        if not isinstance(data, dict):
            raise _bad(path.name, "not a JSON object")
        if path.name == "tokenizer_config.json":
            tokenizer_config_check(data)
