"""Reading the normalized file in bounded memory: a line longer than a piece comes in pieces."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from datasets_app import formats
from datasets_app.formats import (
    FormatError,
    Normalized,
    Source,
    _json_line,
    texts_iter,
    texts_normalize,
    texts_stream,
)

ROOT = Path(__file__).resolve().parents[2]
ALPHABET = ["a", " ", "é", "😀", "日", "\n", "\t", '"', "\\", "\ud83d", "\x01", "/", "\\u", "x"]


def _file(tmp_path, texts: list[str]):
    path = tmp_path / "texts.jsonl"
    path.write_bytes(b"".join(_json_line(t) for t in texts))
    return path


def _joined(docs) -> list[str]:
    return [d if isinstance(d, str) else "".join(d) for d in docs]


@pytest.mark.parametrize("piece_bytes", [7, 8, 13, 64, 1000])
def test_long_lines_come_in_pieces_that_join_to_the_text(tmp_path, piece_bytes):
    rng = random.Random(piece_bytes)
    for _ in range(40):  # escapes, multi-byte characters, surrogate pairs and lone surrogates
        texts = ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 300)))
                 for _ in range(rng.randint(1, 5))]  # fmt: skip
        path = _file(tmp_path, texts)
        assert _joined(texts_stream(path, piece_bytes)) == texts == list(texts_iter(path))


def test_short_lines_are_strings_and_long_ones_iterators(tmp_path):
    path = _file(tmp_path, ["short", "long " * 100, "short again"])
    docs = list(texts_stream(path, 64))
    assert docs[0] == "short" and docs[2] == "short again"
    # the long line's iterator was skipped unread: the lines after it still come right
    assert not isinstance(docs[1], str)


def test_a_partly_read_long_line_is_skipped_to_the_next(tmp_path):
    texts = ["word " * 5000, "next", "more " * 3000, "last"]
    got = []
    for doc in texts_stream(_file(tmp_path, texts), 256):
        got.append(doc if isinstance(doc, str) else next(iter(doc)))
    assert got[1] == "next" and got[3] == "last"
    assert texts[0].startswith(got[0]) and 0 < len(got[0]) <= 256
    assert texts[2].startswith(got[2]) and 0 < len(got[2]) <= 256


def test_a_broken_long_line_is_refused(tmp_path):
    path = tmp_path / "texts.jsonl"
    path.write_bytes(b'"' + b"a" * 100 + b"\n")  # no closing quote
    with pytest.raises(FormatError, match="ends inside its text"):
        _joined(texts_stream(path, 16))
    path.write_bytes(b'"' + b"a" * 100 + b"\\q" + b"a" * 100 + b'"\n')
    with pytest.raises(FormatError, match="invalid escape"):
        _joined(texts_stream(path, 16))


# ---------------------------------------------------------------------------------------------
# Importing a .txt file whose lines are longer than a read piece


TXT_ALPHABET = ["a", " ", "é", "😀", "日", "\t", "\r", "\r\n", "\n", "x", '"', "\\"]


def _expected(raw: bytes) -> list[str]:
    """What a whole-line reader keeps: each line decoded, its line break stripped, blanks out."""
    lines = raw.decode("utf-8").removeprefix("\ufeff").split("\n")
    texts = [line.rstrip("\r\n") for line in lines]
    if raw.endswith(b"\n"):
        texts = texts[:-1]
    return [t for t in texts if t.strip()]


def _normalized(tmp_path, raw: bytes) -> tuple[Normalized, list[str]]:
    src = tmp_path / "in.txt"
    src.write_bytes(raw)
    dest = tmp_path / "texts.jsonl"
    result = texts_normalize([Source(src, "txt")], dest)
    return result, list(texts_iter(dest))


@pytest.mark.parametrize("piece_bytes", [5, 16, 64])
def test_long_txt_lines_import_like_whole_lines(tmp_path, monkeypatch, piece_bytes):
    monkeypatch.setattr(formats, "LINE_PIECE_BYTES", piece_bytes)
    rng = random.Random(piece_bytes)
    for _ in range(40):
        text = "".join(rng.choice(TXT_ALPHABET) for _ in range(rng.randint(1, 400)))
        raw = ("\ufeff" if rng.random() < 0.3 else "").encode() + text.encode()
        if not _expected(raw):
            continue
        result, got = _normalized(tmp_path, raw)
        assert got == _expected(raw), repr(text)
        assert result.row_count == len(got)
        assert result.preview[0] == (got[0] if len(got[0]) <= 300 else result.preview[0])


def test_a_blank_long_line_is_skipped_and_the_preview_is_cut(tmp_path, monkeypatch):
    monkeypatch.setattr(formats, "LINE_PIECE_BYTES", 32)
    raw = b" \t" * 500 + b"\n" + b"word " * 400 + b"\r\n" + b"last\n"
    result, got = _normalized(tmp_path, raw)
    assert got == [("word " * 400).rstrip("\r\n"), "last"] and result.row_count == 2
    assert result.preview[0].endswith("…") and len(result.preview[0]) <= 301


def test_bad_utf8_in_a_long_line_names_the_line(tmp_path, monkeypatch):
    monkeypatch.setattr(formats, "LINE_PIECE_BYTES", 16)
    raw = b"fine\n" + b"a" * 40 + b"\xff" + b"b" * 40 + b"\n"
    with pytest.raises(
        FormatError, match=r"Line 2 is not valid UTF-8 text \(byte 41 of the line\)"
    ):
        _normalized(tmp_path, raw)
    assert not (tmp_path / "texts.jsonl").exists()


IMPORT_PROBE = """
import json, resource, sys
from pathlib import Path
from datasets_app.formats import Source, texts_normalize

src, dest = Path(sys.argv[1]), Path(sys.argv[2])
texts_normalize([Source(src.with_name("warm.txt"), "txt")], dest.with_name("warm.jsonl"))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
result = texts_normalize([Source(src, "txt")], dest)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"rows": result.row_count, "grew_kib": after - before}))
"""


def test_importing_a_line_of_tens_of_mb_holds_a_piece_not_the_line(tmp_path):
    sentence = "The quick brown fox jumps over the lazy dog — «ünïcødé» 😀. "
    src = tmp_path / "one-line.txt"
    (tmp_path / "warm.txt").write_text(sentence * 100 + "\n", encoding="utf-8")
    with open(src, "w", encoding="utf-8") as fh:
        fh.write("a short first line\n")
        fh.write(sentence * (40 * 2**20 // len(sentence.encode())))
        fh.write("\nlast\n")
    out = subprocess.run(
        [sys.executable, "-c", IMPORT_PROBE, str(src), str(tmp_path / "texts.jsonl")],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=True,
    )  # fmt: skip
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["rows"] == 3
    assert result["grew_kib"] < 48 * 1024, result  # whole, the line would cost over 40 MB
    docs = texts_stream(tmp_path / "texts.jsonl")
    assert next(docs) == "a short first line"
    assert next(iter(next(docs))).startswith(sentence) and next(docs) == "last"
