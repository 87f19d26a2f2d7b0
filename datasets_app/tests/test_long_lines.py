"""Reading the normalized file in bounded memory: a line longer than a piece comes in pieces."""

from __future__ import annotations

import random

import pytest

from datasets_app.formats import FormatError, _json_line, texts_iter, texts_stream

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
