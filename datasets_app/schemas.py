"""The one validation source for dataset requests: used by the HTML views and the JSON API."""

from __future__ import annotations

from typing import Annotated

from ninja import Schema
from pydantic import AfterValidator, Field

from mistudio.apischema import ByteCountsOut, JobOut
from mistudio.validation import AccessToken, DatasetRepoId, Revision

from .hubdata import SPLIT_RE

NAME_MAX = 200
TEXT_FIELD_MAX = 200


def _name(value: str | None) -> str | None:
    value = (value or "").strip()
    if not value:
        return None  # the service names it after the file or the repo
    if len(value) > NAME_MAX:
        raise ValueError(f"A name has at most {NAME_MAX} characters.")
    if not value.isprintable():
        raise ValueError("A name cannot hold control characters.")
    return value


def _text_field(value: str | None) -> str:
    value = (value or "").strip()
    if not value:
        return "text"
    if len(value) > TEXT_FIELD_MAX or not value.isprintable():
        raise ValueError("Enter the name of the field or column that holds the text, e.g. text.")
    return value


def _split(value: str | None) -> str:
    value = (value or "").strip() or "train"
    if not SPLIT_RE.fullmatch(value):
        raise ValueError("A split is a name such as train, validation or test.")
    return value


Name = Annotated[str | None, Field(max_length=1000), AfterValidator(_name)]
TextField = Annotated[str | None, Field(max_length=1000), AfterValidator(_text_field)]
Split = Annotated[str | None, Field(max_length=200), AfterValidator(_split)]


class UploadIn(Schema):
    """The fields of an upload besides the file itself (name defaults to the file's stem)."""

    name: Name = None
    text_field: TextField = "text"


class HubImportIn(Schema):
    """A Hub dataset split to import (name defaults to "<repo> (<split>)")."""

    hf_dataset_id: DatasetRepoId
    split: Split = "train"
    text_field: TextField = "text"
    revision: Revision = None
    access_token: AccessToken = None
    name: Name = None


class DatasetOut(JobOut, ByteCountsOut):
    id: str
    name: str
    source: str
    original_filename: str
    file_format: str
    hf_dataset_id: str
    split: str
    revision: str
    commit_sha: str
    text_field: str
    row_count: int
    size_bytes: int
    preview: list[str]
