"""The one validation source for model requests: used by the HTML views, the JSON API, the CLI."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from ninja import Schema
from pydantic import AfterValidator, BeforeValidator, Field, StrictBool

from mistudio import limits
from mistudio.apischema import ByteCountsOut, JobOut
from mistudio.validation import AccessToken, ModuleSites, PushRepoId, RepoId, Revision

QuantizationName = Literal["FP16", "Q8", "Q4", "Q2"]


class EstimateIn(Schema):
    hf_repo_id: RepoId
    access_token: AccessToken = None
    revision: Revision = None


class DownloadIn(EstimateIn):
    quantization: QuantizationName = "Q4"


def _search_text(value: str) -> str:
    value = value.strip()
    if not value or not value.isprintable():
        raise ValueError("Type a few letters of a model name, e.g. llama or gpt2.")
    return value


SearchText = Annotated[str, Field(max_length=96), AfterValidator(_search_text)]
CommitSha = Annotated[str, Field(pattern=r"^[0-9a-f]{40}$")]


class RetryIn(Schema):
    access_token: AccessToken = None


class SearchIn(Schema):
    q: SearchText


class AddCachedIn(Schema):
    """A model already complete in the local HF cache, added without downloading it."""

    hf_repo_id: RepoId
    quantization: QuantizationName = "Q4"
    commit: CommitSha | None = None


class SearchResult(Schema):
    id: str
    downloads: int
    likes: int
    gated: bool
    params: int | None
    fits: list[dict]


class SearchOut(Schema):
    query: str
    results: list[SearchResult]


class CachedRepoOut(Schema):
    repo_id: str
    commit: str
    size_bytes: int
    path: str
    added: list[str]


class ModelOut(JobOut, ByteCountsOut):
    id: str
    name: str
    hf_repo_id: str
    revision: str
    commit_sha: str
    quantization: str
    params: int | None
    params_display: str
    num_layers: int | None
    hidden_dim: int | None
    num_heads: int | None
    vocab_size: int | None
    max_position: int | None
    architecture: str
    dtype: str
    quant_backend: str
    size_bytes: int
    mem_req_bytes: int | None
    memReq: str  # noqa: N815 - the seed's field name
    is_loaded: bool
    load_notice: str


class ArchitectureOut(Schema):
    total_layers: int
    hidden_dimension: int
    attention_heads: int
    parameters: int
    layers: list[dict]
    config: dict


def _unique_sorted(values: list) -> list:
    return sorted(set(values))


def _printable_id(value: str) -> str:
    if not value.isprintable():
        raise ValueError("An id is printable text, without control characters.")
    return value


_WHOLE_RE = re.compile(r"[+-]?[0-9]{1,30}")


def whole_number(low: int, high: int):
    """An int field between low and high (inclusive) that refuses anything else (a float such
    as 1e30 or 2.5, a bool, a non-numeric string, a number out of range) with one clear message:
    "must be a whole number between low and high" (an integral float like 8.0 and a digit string
    like "8", as the HTML form posts, are taken)."""
    message = f"must be a whole number between {low} and {high}."

    def check(value: object) -> int:
        if isinstance(value, str) and _WHOLE_RE.fullmatch(value.strip()):
            value = int(value.strip())
        elif isinstance(value, float) and value.is_integer() and abs(value) <= high:
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(message)
        return value

    return Annotated[int, BeforeValidator(check)]


LayerIndex = Annotated[int, Field(ge=0, le=limits.LAYER_INDEX_MAX)]
HookType = Literal[limits.HOOK_TYPES]  # type: ignore[valid-type]
SpecialTokens = Literal[limits.SPECIAL_TOKENS]  # type: ignore[valid-type]
OutputFormat = Literal[limits.OUTPUT_FORMATS]  # type: ignore[valid-type]


class ExtractionSettings(Schema):
    """What to extract, whatever the dataset (a template holds these). Model-specific bounds
    (layer count, context length) are checked by the service against the real model."""

    layers: Annotated[
        list[LayerIndex],
        Field(min_length=1, max_length=limits.LAYERS_PER_JOB_MAX),
        AfterValidator(_unique_sorted),
    ]
    hook_types: Annotated[
        list[HookType],
        Field(min_length=1, max_length=len(limits.HOOK_TYPES)),
        AfterValidator(_unique_sorted),
    ]
    module_sites: ModuleSites = []  # advanced: module paths of the model, input or output
    batch_size: whole_number(limits.BATCH_SIZE_MIN, limits.BATCH_SIZE_MAX) = (
        limits.DEFAULT_BATCH_SIZE
    )
    max_samples: whole_number(limits.MAX_SAMPLES_MIN, limits.MAX_SAMPLES_MAX) = (
        limits.DEFAULT_MAX_SAMPLES
    )
    context_size: whole_number(limits.CONTEXT_SIZE_MIN, limits.CONTEXT_SIZE_MAX) | None = None
    # "text": special-token strings in the data are plain text; "parse": they are special tokens
    special_tokens: SpecialTokens = limits.DEFAULT_SPECIAL_TOKENS
    # "safetensors" (the shards) or "safetensors+saelens" (also a SAELens datasets folder)
    output_format: OutputFormat = limits.DEFAULT_OUTPUT_FORMAT


class ExtractionIn(ExtractionSettings):
    """An extraction request (modal, API, CLI): the settings and the dataset to read."""

    dataset_id: Annotated[str, Field(min_length=1, max_length=64), AfterValidator(_printable_id)]


class ExtractionPartOut(Schema):
    """One part of an extraction: whole shards [shard_start, shard_end), run by one worker."""

    index: int
    shard_start: int
    shard_end: int
    status: str
    device: str  # the worker's device (cuda:1, cpu:0), empty before a worker took it
    shards_done: int
    tokens_done: int
    tokens_total: int
    tokens_per_second: float
    attempts: int  # times a worker took it (more than 1: resumed after a crash)
    last_error: str


class ExportOut(JobOut):
    format: str
    path: str
    bytes_written: int
    missing: bool  # completed, but the folder was removed or is incomplete: export again


class ExtractionOut(JobOut):
    id: str
    model_id: str
    dataset_id: str | None
    dataset_name: str
    layers: list[int]
    hook_types: list[str]
    module_sites: list[dict]
    batch_size: int
    batch_size_used: int | None
    max_samples: int
    context_size: int
    special_tokens: str
    output_format: str
    tokens_done: int
    tokens_total: int
    tokens_per_second: float
    output_path: str
    bytes_written: int
    manifest: dict | None
    statistics: dict | None
    parts: list[ExtractionPartOut] = []
    export: ExportOut | None


class ExportIn(Schema):
    """POST /api/extractions/{id}/export: the format to export a completed extraction to."""

    format: Literal["saelens"] = "saelens"


class ExtractionEstimateIn(ExtractionSettings):
    """The settings to estimate, and optionally the dataset (its size bounds the sequences)."""

    dataset_id: (
        Annotated[str, Field(min_length=1, max_length=64), AfterValidator(_printable_id)] | None
    ) = None


class EstimateOut(Schema):
    """What an extraction would write at most (bytes, an upper bound) and the room for it (see
    extraction_estimate)."""

    n_sequences: int
    n_tokens: int
    upper_bound: bool
    n_sites: int
    widths: list[int]
    d: int | None  # the one width of every site, None when they differ
    d_sum: int
    bytes_per_element: int
    shard_bytes: int
    saelens_bytes: int
    output_bytes: int
    needed_bytes: int
    free_bytes: int
    margin_bytes: int
    fits: bool
    folder: str


class ExtractionStarted(Schema):
    extraction_id: str
    status: str


class SiteOut(Schema):
    name: str
    module_path: str
    reads: str
    shape: list[int] | None
    d: int | None


class SitesIn(Schema):
    """Sites to check against a model (POST /api/models/{id}/sites): the same fields as an
    extraction request, all optional."""

    layers: Annotated[
        list[LayerIndex],
        Field(max_length=limits.LAYERS_PER_JOB_MAX),
        AfterValidator(_unique_sorted),
    ] = []
    hook_types: Annotated[
        list[HookType], Field(max_length=len(limits.HOOK_TYPES)), AfterValidator(_unique_sorted)
    ] = []
    module_sites: ModuleSites = []


class PushIn(Schema):
    """Push a completed extraction to a Hub dataset repo (the token is kept sealed only until
    the push ends)."""

    repo_id: PushRepoId
    token: AccessToken = None
    private: StrictBool = True  # JSON true/false only: "yes" or "false" is refused (422)


class PushOut(JobOut, ByteCountsOut):
    id: str
    extraction_id: str
    repo_id: str
    private: bool
    repo_url: str
    commit_sha: str
    files_total: int
