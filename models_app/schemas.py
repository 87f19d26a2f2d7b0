"""The one validation source for model requests: used by the HTML views, the JSON API and the CLI."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from ninja import Schema
from pydantic import AfterValidator, Field

from .hub import HubError, repo_id_clean, revision_clean

QuantizationName = Literal["FP16", "Q8", "Q4", "Q2"]
TOKEN_MAX = 500


def _hub_checked(fn):
    def check(value):
        try:
            return fn(value)
        except HubError as exc:
            raise ValueError(exc.message) from None

    return check


def _token_clean(value: str | None) -> str | None:
    value = (value or "").strip()
    if not value:
        return None
    if not value.isascii() or not value.isprintable() or " " in value:
        raise ValueError("An access token is one word of printable ASCII characters.")
    return value


RepoId = Annotated[str, Field(max_length=400), AfterValidator(_hub_checked(repo_id_clean))]
Revision = Annotated[str | None, Field(max_length=200), AfterValidator(_hub_checked(revision_clean))]
AccessToken = Annotated[str | None, Field(max_length=TOKEN_MAX), AfterValidator(_token_clean)]


class EstimateIn(Schema):
    hf_repo_id: RepoId
    access_token: AccessToken = None
    revision: Revision = None


class DownloadIn(EstimateIn):
    quantization: QuantizationName = "Q4"


class ModelOut(Schema):
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
    status: str
    phase: str
    progress: float
    bytes_done: int
    bytes_total: int
    speed_bps: float
    eta_seconds: float | None
    error_message: str
    size_bytes: int
    mem_req_bytes: int | None
    memReq: str  # noqa: N815 - the seed's field name
    is_loaded: bool
    load_notice: str
    created_at: datetime
    updated_at: datetime


class ArchitectureOut(Schema):
    total_layers: int
    hidden_dimension: int
    attention_heads: int
    parameters: int
    layers: list[dict]
    config: dict


class ErrorOut(Schema):
    detail: str
    code: str = "invalid"
