"""Readers and the normalized writer, on real files (no database)."""

from __future__ import annotations

import gzip
import json

import pytest

from datasets_app.formats import (
    FormatError,
    ImportCancelled,
    Source,
    format_of,
    texts_check,
    texts_iter,
    texts_normalize,
    texts_read,
)

from .helpers import jsonl_bytes, parquet_bytes


def write(tmp_path, name: str, content: bytes):
    path = tmp_path / name
    path.write_bytes(content)
    return path


def normalize(tmp_path, name: str, content: bytes, fmt: str, field: str | None = "text"):
    dest = tmp_path / "texts.jsonl"
    result = texts_normalize([Source(write(tmp_path, name, content), fmt, field)], dest)
    return result, list(texts_iter(dest))


def refused(tmp_path, name: str, content: bytes, fmt: str, field: str | None = "text") -> str:
    with pytest.raises(FormatError) as err:
        normalize(tmp_path, name, content, fmt, field)
    assert not (tmp_path / "texts.jsonl").exists()
    assert not (tmp_path / "texts.jsonl.partial").exists()
    return err.value.message


def test_txt_is_one_document_per_line_and_skips_blank_lines(tmp_path):
    content = "\ufefffirst line\r\n\n   \nsecond — ünïcode\nlast without newline".encode()
    result, texts = normalize(tmp_path, "a.txt", content, "txt", None)
    assert texts == ["first line", "second — ünïcode", "last without newline"]
    assert result.row_count == 3 and result.preview == texts
    assert result.size_bytes == (tmp_path / "texts.jsonl").stat().st_size


def test_each_line_of_the_normalized_file_is_one_json_string(tmp_path):
    text = 'quotes " and \\ and a\ttab'
    normalize(tmp_path, "a.jsonl", jsonl_bytes([{"text": text}, {"text": "two\nlines"}]), "jsonl")
    lines = (tmp_path / "texts.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [text, "two\nlines"]


def test_bad_utf8_names_the_line(tmp_path):
    message = refused(tmp_path, "a.txt", b"fine\nalso fine\nbad \xff byte\n", "txt", None)
    assert "Line 3" in message and "UTF-8" in message


def test_jsonl_reads_the_chosen_field_and_treats_null_as_empty(tmp_path):
    rows = [{"text": "a", "x": 1}, {"text": None}, {"text": "  "}, {"text": "b"}]
    result, texts = normalize(tmp_path, "a.jsonl", jsonl_bytes(rows) + b"\n\n", "jsonl")
    assert texts == ["a", "b"] and result.row_count == 2


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b'{"text": "ok"}\n{"text": "broken\n', ["Line 2", "not valid JSON"]),
        (b'{"text": "ok"}\n{"body": "x", "id": 3}\n', ["Line 2", "no field 'text'", "body, id"]),
        (b'{"text": "ok"}\n\n{"text": 42}\n', ["Line 3", "a number", "not a string"]),
        (b'["a", "list"]\n', ["Line 1"]),
        (b'"just a string"\n', ["Line 1", "not a JSON object"]),
    ],
)
def test_bad_jsonl_lines_are_named(tmp_path, content, words):
    message = refused(tmp_path, "a.jsonl", content, "jsonl")
    for word in words:
        assert word in message


def test_csv_reads_the_column_with_quotes_and_embedded_newlines(tmp_path):
    big = "x" * 200_000  # larger than the csv module's default field limit
    content = f'id,text\n1,"hello, world"\n2,"two\nlines"\n3,\n4,{big}\n'.encode()
    result, texts = normalize(tmp_path, "a.csv", content, "csv")
    assert texts == ["hello, world", "two\nlines", big] and result.row_count == 3
    assert result.preview[2].endswith("…") and len(result.preview[2]) == 301


def test_csv_without_the_column_lists_the_columns(tmp_path):
    message = refused(tmp_path, "a.csv", b"id,body\n1,hello\n", "csv")
    assert "no column 'text'" in message and "id, body" in message


def test_csv_short_rows_and_bad_bytes_name_the_line(tmp_path):
    assert "Line 3" in refused(tmp_path, "a.csv", b"text,id\na,1\nb\n", "csv", "id")
    assert "Line 2" in refused(tmp_path, "b.csv", b"text\n\xc3\x28\n", "csv")


def test_parquet_reads_the_column_in_batches(tmp_path):
    texts = [f"row {i}" for i in range(2500)] + [None, ""]
    content = parquet_bytes({"text": texts, "n": list(range(2502))}, row_group_size=700)
    result, out = normalize(tmp_path, "a.parquet", content, "parquet")
    assert result.row_count == 2500 and out[0] == "row 0" and out[-1] == "row 2499"


def test_parquet_wrong_or_non_text_column_is_refused(tmp_path):
    content = parquet_bytes({"body": ["a"], "n": [1]})
    assert "no column 'text'" in refused(tmp_path, "a.parquet", content, "parquet")
    assert "not text" in refused(tmp_path, "b.parquet", content, "parquet", "n")
    assert "not a valid Parquet" in refused(tmp_path, "c.parquet", b"PAR1 nope", "parquet")


@pytest.mark.parametrize(
    ("name", "content", "fmt", "field"),
    [
        ("a.txt", b"\n  \n\t\n", "txt", None),
        ("a.jsonl", b'{"text": ""}\n', "jsonl", "text"),
        ("a.csv", b"text\n", "csv", "text"),
        ("a.csv", b"", "csv", "text"),
    ],
)
def test_files_with_no_text_are_refused(tmp_path, name, content, fmt, field):
    assert "No text found" in refused(tmp_path, name, content, fmt, field)


def test_gzip_files_are_read_and_corrupt_ones_refused(tmp_path):
    _, texts = normalize(tmp_path, "a.jsonl.gz", gzip.compress(b'{"text": "zipped"}\n'), "jsonl")
    assert texts == ["zipped"]
    (tmp_path / "b").mkdir()
    assert "gzip" in refused(tmp_path / "b", "b.txt.gz", b"\x1f\x8b not gzip", "txt", None)


def test_a_lone_surrogate_is_kept_as_an_escape(tmp_path):
    _, texts = normalize(tmp_path, "a.jsonl", b'{"text": "odd \\ud800 char"}\n', "jsonl")
    assert texts == ["odd \ud800 char"]


def test_several_files_make_one_dataset_and_errors_name_the_file(tmp_path):
    a = write(tmp_path, "a.jsonl", jsonl_bytes([{"text": "one"}]))
    b = write(tmp_path, "b.jsonl", b'{"text": 1}\n')
    dest = tmp_path / "texts.jsonl"
    with pytest.raises(FormatError) as err:
        texts_normalize(
            [Source(a, "jsonl", "text", "a.jsonl"), Source(b, "jsonl", "text", "b")], dest
        )
    assert err.value.message.startswith("b: Line 1") and not dest.exists()


def test_a_cancel_from_the_tick_leaves_nothing(tmp_path):
    path = write(tmp_path, "a.txt", b"line\n" * 5000)
    ticks = []

    def tick(fraction, rows):
        ticks.append(fraction)
        raise ImportCancelled()

    with pytest.raises(ImportCancelled):
        texts_normalize(
            [Source(path, "txt")], tmp_path / "texts.jsonl", on_tick=tick, tick_seconds=0
        )
    assert len(ticks) == 1 and 0 < ticks[0] < 1
    assert not list(tmp_path.glob("texts.jsonl*"))


def test_texts_read_streams_without_normalizing(tmp_path):
    path = write(tmp_path, "a.txt", b"a\n\nb\n")
    assert list(texts_read(path, "txt", None)) == ["a", "", "b"]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("x.TXT", "txt"),
        ("x.jsonl", "jsonl"),
        ("x.csv", "csv"),
        ("x.parquet", "parquet"),
        ("x.json", None),
        ("x.xlsx", None),
        ("x", None),
        ("x.jsonl.gz", None),
    ],
)
def test_upload_formats_come_from_the_extension(name, expected):
    assert format_of(name) == expected


def test_texts_check_reads_only_the_first_rows_or_bytes_and_writes_nothing(tmp_path):
    """What an upload's request reads: up to `rows` rows, stopping after the row that passes
    `text_bytes`; a bad row later is the worker's to find. Read to its end, a file with only
    blank rows is refused there."""
    tmp_path = tmp_path / "files"
    tmp_path.mkdir()
    path = write(tmp_path, "a.txt", b"0123456789\n" * 3 + b"\xff bad\n")
    texts_check(path, "txt", None, rows=3)  # the bad line 4 is not read
    texts_check(path, "txt", None, text_bytes=20)  # stops after line 2 (20 bytes of text)
    with pytest.raises(FormatError, match="Line 4 is not valid UTF-8"):
        texts_check(path, "txt", None, text_bytes=31)
    with pytest.raises(FormatError, match="No text found"):
        texts_check(write(tmp_path, "b.txt", b"\n  \n"), "txt", None)
    texts_check(write(tmp_path, "c.txt", b"\n" * 5 + b"late text\n"), "txt", None, rows=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt", "c.txt"]
