"""Dataset files → one stream of texts → the normalized `texts.jsonl` every dataset ends as.

No Django here. Readers stream (a line or a Parquet batch at a time, never a whole file) and raise
`FormatError` with a message that names the line and says what to fix. The writer skips empty rows,
writes to a temporary name and renames it into place only when every row was read.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import gzip
import json
import os
import re
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

# Upload formats; Hub imports also read `.json` (as JSON Lines) and gzip-compressed text formats.
UPLOAD_FORMATS = {".txt": "txt", ".jsonl": "jsonl", ".csv": "csv", ".parquet": "parquet"}
HUB_FORMATS = {**UPLOAD_FORMATS, ".json": "jsonl"}
FIELD_FORMATS = ("jsonl", "csv", "parquet")  # formats that need a text field / column
TEXTS_FILE = "texts.jsonl"
PREVIEW_ROWS = 5
PREVIEW_CHARS = 300
PARQUET_BATCH_ROWS = 1024
PARQUET_BATCH_BYTES = 64 * 1024 * 1024  # decoded bytes one Parquet batch may hold (estimated)
LINE_PIECE_BYTES = 256 * 1024  # a normalized line longer than this is read in pieces this big
CHECK_ROWS, CHECK_BYTES = 200, 16 * 1024 * 1024  # what an upload's request reads (texts_check)
# Caps against decompression bombs (defaults; the apps pass their settings,
# MISTUDIO_DATASET_ROW_MAX_MB and MISTUDIO_DATASET_INFLATED_MAX_MB): one row's text, and the
# normalized output of one dataset. Over a cap the import ends with FormatError.
ROW_MAX_BYTES = 64 * 1024 * 1024  # a long .txt line streams in pieces; other rows are held whole
INFLATED_MAX_BYTES = 8 * 1024**3
# A CSV cell can hold a whole document, up to the row cap (the csv module's default is 128 KiB).
csv.field_size_limit(ROW_MAX_BYTES)


class FormatError(Exception):
    """The file cannot be read as the dataset asked for; `message` says what to fix."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InflatedTooLarge(FormatError):
    """The normalized texts passed the inflated-size cap."""


class ImportCancelled(Exception):
    """Raised between rows, batches or download chunks when the job was cancelled."""


def format_of(filename: str, formats: dict[str, str] = UPLOAD_FORMATS) -> str | None:
    """'train.csv' → 'csv'; 'a.jsonl.gz' → 'jsonl' when gzip is allowed (Hub files); else None."""
    name = filename.lower()
    if name.endswith(".gz") and formats is HUB_FORMATS:
        name = name[:-3]
        if name.endswith(".parquet"):
            return None
    return formats.get(Path(name).suffix)


@dataclass
class Meter:
    """How far a reader is through its file, in bytes or rows (whichever it can tell)."""

    total: int = 0
    done: int = 0
    row_max: int = ROW_MAX_BYTES

    def fraction(self) -> float:
        return min(self.done / self.total, 1.0) if self.total > 0 else 0.0


@contextlib.contextmanager
def _binary(path: Path, meter: Meter):
    """Open `path` for reading bytes (gunzipped for `.gz`); the meter counts compressed bytes."""
    meter.total = path.stat().st_size
    with open(path, "rb") as raw:
        if path.name.lower().endswith(".gz"):
            with gzip.GzipFile(fileobj=raw) as stream:
                yield stream, raw
        else:
            yield raw, raw


def _decoded_lines(path: Path, meter: Meter) -> Iterator[tuple[int, str]]:
    """(line number from 1, line with its newline) decoded as strict UTF-8; a line longer than
    meter.row_max bytes is refused before it is read whole (a one-line gzip bomb)."""
    with _binary(path, meter) as (stream, raw):
        try:
            number = 0
            while line := stream.readline(meter.row_max + 1):
                number += 1
                if len(line) > meter.row_max:
                    raise FormatError(_row_message(f"Line {number}", meter.row_max))
                meter.done = raw.tell()
                yield number, _utf8(line, number)
        except (gzip.BadGzipFile, EOFError, zlib.error):
            raise FormatError(f"{path.name} is not a valid gzip file.") from None


def _row_message(where: str, row_max: int) -> str:
    return (
        f"{where} is longer than {row_max // 1024 // 1024} MB, the largest row miStudio reads"
        " (MISTUDIO_DATASET_ROW_MAX_MB); nothing was kept."
    )


def _utf8(line: bytes, number: int) -> str:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FormatError(
            f"Line {number} is not valid UTF-8 text (byte {exc.start + 1} of the line). Save the"
            " file with UTF-8 encoding and try again."
        ) from None
    return text.removeprefix("\ufeff") if number == 1 else text


def _read_txt(path: Path, text_field: str | None, meter: Meter) -> Iterator[str | Iterator[str]]:
    """Each line without its line break; a line over LINE_PIECE_BYTES as an iterator of its text
    in pieces (decoded as read, what is not read is skipped), so no line is ever held whole."""
    with _binary(path, meter) as (stream, raw):
        try:
            number = 0
            while line := stream.readline(LINE_PIECE_BYTES):
                number += 1
                meter.done = raw.tell()
                if line.endswith(b"\n") or len(line) < LINE_PIECE_BYTES:
                    yield _utf8(line, number).rstrip("\r\n")
                    continue
                long_line = _LongTxtLine(stream, raw, meter, line, number)
                yield long_line.pieces()
                long_line.skip_rest()
        except (gzip.BadGzipFile, EOFError, zlib.error):
            raise FormatError(f"{path.name} is not a valid gzip file.") from None


class _LongTxtLine:
    """One line of a text file too long to hold, decoded as strict UTF-8 a piece at a time."""

    def __init__(self, stream, raw, meter: Meter, head: bytes, number: int):
        self.stream, self.raw, self.meter = stream, raw, meter
        self.head, self.number = head, number
        self.ended = False

    def _read(self) -> bytes:
        chunk = self.stream.readline(LINE_PIECE_BYTES)
        self.meter.done = self.raw.tell()
        self.ended = not chunk or chunk.endswith(b"\n")
        return chunk

    def pieces(self) -> Iterator[str]:
        decoder = codecs.getincrementaldecoder("utf-8")("strict")
        chunk, self.head, carry, done = self.head, b"", "", 0
        while True:
            try:
                text = carry + decoder.decode(chunk, final=self.ended)
            except UnicodeDecodeError as exc:
                raise FormatError(
                    f"Line {self.number} is not valid UTF-8 text (byte {done + exc.start + 1} of"
                    " the line). Save the file with UTF-8 encoding and try again."
                ) from None
            if done == 0 and self.number == 1:
                text = text.removeprefix("\ufeff")
            done += len(chunk)
            if self.ended:
                if text := text.rstrip("\r\n"):
                    yield text
                return
            kept = text.rstrip("\r")  # a \r right before the line break is not text
            carry = text[len(kept) :]
            if kept:
                yield kept
            chunk = self._read()

    def skip_rest(self) -> None:
        while not self.ended:
            self._read()


NUMBER = "a number"
JSON_TYPES = {dict: "an object", list: "a list", bool: "true/false", int: NUMBER, float: NUMBER}


def _json_text(obj: object, text_field: str, where: str) -> str:
    if not isinstance(obj, dict):
        raise FormatError(f"{where} is {JSON_TYPES.get(type(obj), 'not')} a JSON object.")
    if text_field not in obj:
        keys = ", ".join(list(obj)[:10]) or "none"
        raise FormatError(f"{where} has no field '{text_field}' (its fields: {keys}).")
    value = obj[text_field]
    if value is None:
        return ""  # a null text counts as an empty row
    if not isinstance(value, str):
        raise FormatError(
            f"{where}: field '{text_field}' is {JSON_TYPES.get(type(value), 'not text')}, not a"
            " string."
        )
    return value


def _read_jsonl(path: Path, text_field: str | None, meter: Meter) -> Iterator[str]:
    assert text_field
    for number, line in _decoded_lines(path, meter):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as exc:
            hint = " (a JSON array file is not JSON Lines)" if line.lstrip().startswith("[") else ""
            msg = getattr(exc, "msg", "invalid JSON")
            raise FormatError(f"Line {number} is not valid JSON: {msg}{hint}.") from None
        yield _json_text(obj, text_field, f"Line {number}")


def _read_csv(path: Path, text_field: str | None, meter: Meter) -> Iterator[str]:
    assert text_field
    csv.field_size_limit(meter.row_max)
    lines = _decoded_lines(path, meter)
    reader = csv.reader(line for _, line in lines)
    try:
        header = next(reader, None)
        if header is None:
            return
        if text_field not in header:
            columns = ", ".join(header[:20]) or "none"
            raise FormatError(f"The CSV header has no column '{text_field}' (columns: {columns}).")
        column = header.index(text_field)
        for row in reader:
            if not row:
                continue
            if column >= len(row):
                raise FormatError(
                    f"Line {reader.line_num} has {len(row)} columns; the header has {len(header)}."
                )
            yield row[column]
    except csv.Error as exc:
        if "field larger than field limit" in str(exc):
            raise FormatError(_row_message(f"Line {reader.line_num}", meter.row_max)) from None
        raise FormatError(f"Line {reader.line_num} is not valid CSV: {exc}.") from None


def _parquet_column(path: Path, text_field: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        # dictionary-encoded text stays encoded: a 4 MiB value repeated 1,024 times is one
        # value and 1,024 indices, expanded one row at a time (never 4 GB in one batch)
        pf = pq.ParquetFile(path)
        if text_field in pf.schema_arrow.names:
            pf = pq.ParquetFile(path, read_dictionary=[text_field])
    except (pa.ArrowException, OSError, KeyError):
        raise FormatError(f"{path.name} is not a valid Parquet file.") from None
    schema = pf.schema_arrow
    if text_field not in schema.names:
        columns = ", ".join(schema.names[:20]) or "none"
        raise FormatError(f"The Parquet file has no column '{text_field}' (columns: {columns}).")
    kind = schema.field(text_field).type
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    if not (
        pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)
    ):
        raise FormatError(f"Column '{text_field}' holds {kind} values, not text.")
    return pf


def _batch_rows(pf, text_field: str) -> int:
    """Rows per batch so that one batch holds about PARQUET_BATCH_BYTES, from the largest
    bytes-per-row the metadata gives for the column (at least 1 row)."""
    meta = pf.metadata
    column = pf.schema_arrow.names.index(text_field)
    per_row = 1
    for i in range(meta.num_row_groups):
        group = meta.row_group(i)
        if group.num_rows and column < group.num_columns:
            size = group.column(column).total_uncompressed_size
            per_row = max(per_row, size // group.num_rows)
    return max(1, min(PARQUET_BATCH_ROWS, PARQUET_BATCH_BYTES // per_row))


def _column_texts(column, row_max: int, first_row: int) -> Iterator[str]:
    """The texts of one batch's column, one at a time; a dictionary column is expanded per
    row. A value over `row_max` bytes raises FormatError naming the row."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_dictionary(column.type):
        dictionary, indices = column.dictionary, column.indices
        sizes = pc.binary_length(dictionary).to_pylist()
        for offset, index in enumerate(indices.to_pylist()):
            if index is None:
                yield ""
                continue
            if (sizes[index] or 0) > row_max:
                raise FormatError(_row_message(f"Row {first_row + offset + 1}", row_max))
            yield dictionary[index].as_py() or ""
        return
    sizes = pc.binary_length(column).to_pylist()
    for offset, size in enumerate(sizes):
        if (size or 0) > row_max:
            raise FormatError(_row_message(f"Row {first_row + offset + 1}", row_max))
        yield column[offset].as_py() or ""  # null counts as an empty row


def _read_parquet(path: Path, text_field: str | None, meter: Meter) -> Iterator[str]:
    import pyarrow as pa

    assert text_field
    pf = _parquet_column(path, text_field)
    meter.total = pf.metadata.num_rows
    rows = _batch_rows(pf, text_field)
    try:
        for batch in pf.iter_batches(batch_size=rows, columns=[text_field]):
            yield from _column_texts(batch.column(0), meter.row_max, meter.done)
            meter.done += batch.num_rows
    except (pa.ArrowException, OSError) as exc:
        raise FormatError(f"{path.name} could not be read: {exc}") from None


READERS: dict[str, Callable[[Path, str | None, Meter], Iterator[str]]] = {
    "txt": _read_txt,
    "jsonl": _read_jsonl,
    "csv": _read_csv,
    "parquet": _read_parquet,
}


def texts_read(
    path: Path, fmt: str, text_field: str | None, meter: Meter | None = None
) -> Iterator[str]:
    """Every row's text in file order (empty rows included); raises FormatError on bad input
    or a row over meter.row_max bytes."""
    return READERS[fmt](path, text_field, meter or Meter())


def texts_check(
    path: Path, fmt: str, text_field: str | None, *, rows: int = CHECK_ROWS,
    text_bytes: int = CHECK_BYTES, row_max: int = ROW_MAX_BYTES,
) -> None:  # fmt: skip
    """Read the first `rows` rows only, stopping after the row that passes `text_bytes` of text:
    catches a wrong field, format or encoding early, a row over `row_max` bytes (a long .txt
    line is read in pieces, counted as it goes) and, for a file read to its end, one with no
    text. Memory stays bounded by one row (one Parquet batch), work by the two limits."""
    seen, blank = 0, True
    for n, text in enumerate(texts_read(path, fmt, text_field, Meter(row_max=row_max)), 1):
        size = 0  # a str row is within row_max already (its reader checks); pieces are counted
        for piece in [text] if isinstance(text, str) else text:
            blank = blank and (not piece or piece.isspace())
            size += len(piece) if isinstance(text, str) else len(piece.encode("utf-8", "replace"))
            if size > row_max:
                raise FormatError(_row_message(f"Line {n}", row_max))
        seen += size
        if n >= rows or seen >= text_bytes:
            return
    if blank:
        raise FormatError("No text found: every row is empty.")


@dataclass
class Normalized:
    """What the normalized file holds: rows kept, its size in bytes, the first texts."""

    row_count: int = 0
    size_bytes: int = 0
    preview: list[str] = field(default_factory=list)


def _json_line(text: str) -> bytes:
    line = json.dumps(text, ensure_ascii=False)
    try:
        return (line + "\n").encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a JSON escape: keep it escaped
        return (json.dumps(text) + "\n").encode("ascii")


def _write_pieces(out, pieces: Iterator[str]) -> str | None:
    """Write one text given in pieces as one JSON line, streaming; returns its first characters
    (enough for a preview), or None, with nothing written, when it is all whitespace."""
    start, head, blank = out.tell(), "", True
    out.write(b'"')
    for piece in pieces:
        blank = blank and not piece.strip()
        out.write(json.dumps(piece, ensure_ascii=False)[1:-1].encode("utf-8"))
        if len(head) <= PREVIEW_CHARS:
            head += piece[: PREVIEW_CHARS + 1]
    if blank:
        out.seek(start)
        out.truncate()
        return None
    out.write(b'"\n')
    return head


def _preview_text(text: str) -> str:
    return text if len(text) <= PREVIEW_CHARS else text[:PREVIEW_CHARS].rstrip() + "…"


class _Ticker:
    """Calls `on_tick(fraction, rows)` at most every `interval` seconds (checked every 64 rows)."""

    def __init__(self, on_tick: Callable[[float, int], None] | None, interval: float = 0.25):
        self.on_tick = on_tick
        self.interval = interval
        self.last = time.monotonic()

    def maybe(self, rows: int, fraction: Callable[[], float]) -> None:
        if self.on_tick is None or rows % 64:
            return
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            self.on_tick(fraction(), rows)


@dataclass
class Source:
    """One file to read: its path, format and the field holding the text."""

    path: Path
    fmt: str
    text_field: str | None = None
    label: str = ""  # prefixed to error messages when a dataset has several files


def _write_rows(
    out, sources: list[Source], result: Normalized, ticker: _Ticker, caps: tuple[int, int]
) -> None:
    row_max, inflated_max = caps
    sizes = [max(s.path.stat().st_size, 1) for s in sources]
    total, before = sum(sizes), 0
    for source, size in zip(sources, sizes, strict=True):
        meter = Meter(row_max=row_max)
        try:
            for text in texts_read(source.path, source.fmt, source.text_field, meter):
                row_start = out.tell()
                if not isinstance(text, str):  # a long .txt line, streamed in pieces
                    text = _write_pieces(out, text)
                    if text is None:
                        continue
                    if out.tell() - row_start > row_max + 3:  # quotes and line break
                        where = f"Row {result.row_count + 1}"
                        raise FormatError(_row_message(where, row_max))
                elif not text.strip():
                    continue
                else:
                    out.write(_json_line(text))
                result.size_bytes = out.tell()
                if result.size_bytes > inflated_max:
                    raise InflatedTooLarge(
                        f"The texts inflate past {inflated_max // 1024 // 1024:,} MB, the"
                        " largest dataset miStudio normalizes here"
                        " (MISTUDIO_DATASET_INFLATED_MAX_MB); nothing was kept."
                    )
                result.row_count += 1
                if len(result.preview) < PREVIEW_ROWS:
                    result.preview.append(_preview_text(text))
                ticker.maybe(
                    result.row_count,
                    lambda m=meter, b=before, s=size: (b + s * m.fraction()) / total,
                )
        except FormatError as exc:
            raise type(exc)(
                f"{source.label}: {exc.message}" if source.label else exc.message
            ) from None
        before += size


def texts_normalize(
    sources: list[Source],
    dest: Path,
    *,
    on_tick: Callable[[float, int], None] | None = None,
    tick_seconds: float = 0.25,
    row_max: int = ROW_MAX_BYTES,
    inflated_max: int = INFLATED_MAX_BYTES,
) -> Normalized:
    """Write every non-empty text of `sources` to `dest` as JSON Lines of strings, atomically.

    `on_tick(fraction 0..1, rows so far)` is called every `tick_seconds` at most and may raise
    ImportCancelled to stop. Raises FormatError (nothing left at `dest`) for bad input, no rows,
    a row over `row_max` bytes; InflatedTooLarge once the output passes `inflated_max` bytes.
    Memory stays bounded by one row (one Parquet batch) whatever the input inflates to.
    """
    partial = dest.with_name(dest.name + ".partial")
    result = Normalized()
    try:
        with open(partial, "wb", buffering=1024 * 1024) as out:
            caps = (row_max, inflated_max)
            _write_rows(out, sources, result, _Ticker(on_tick, tick_seconds), caps)
            out.flush()
            os.fsync(out.fileno())
        if result.row_count == 0:
            raise FormatError("No text found: every row is empty.")
        result.size_bytes = partial.stat().st_size
        os.replace(partial, dest)
    finally:
        partial.unlink(missing_ok=True)
    return result


def texts_iter(path: Path) -> Iterator[str]:
    """The texts of a normalized file, one per line, in order."""
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            yield json.loads(line)


def texts_stream(path: Path, piece_bytes: int = LINE_PIECE_BYTES) -> Iterator[str | Iterator[str]]:
    """The texts of a normalized file in order, in memory bounded by `piece_bytes`.

    A line up to `piece_bytes` comes as a str; a longer one as an iterator of its text in pieces
    of at most about `piece_bytes` bytes, read and decoded only as far as the consumer goes (the
    rest of the line is skipped unread when the next text is asked for). Raises FormatError for a
    line that is not a JSON string.
    """
    with open(path, "rb") as fh:
        while line := fh.readline(piece_bytes):
            if line.endswith(b"\n") or len(line) < piece_bytes:
                yield json.loads(line)
                continue
            long_line = _LongLine(fh, line, piece_bytes)
            yield long_line.pieces()
            long_line.skip_rest()


# Complete units of a JSON string's inside: bytes other than a quote, a backslash or a control
# character; \uXXXX; or a one-letter escape.
_JSON_UNITS = re.compile(rb'(?:[^"\\\x00-\x1f]+|\\u[0-9a-fA-F]{4}|\\["\\/bfnrt])*')
_HIGH_SURROGATE = re.compile(rb"\\u[dD][89abAB][0-9a-fA-F]{2}")


class _LongLine:
    """One line of texts.jsonl too long to hold: `"…"\n` decoded a piece at a time."""

    def __init__(self, fh, head: bytes, piece_bytes: int):
        self.fh, self.head, self.piece_bytes = fh, head, piece_bytes
        self.ended = head.endswith(b"\n")  # the line's newline has been read

    def _read(self) -> bytes:
        more = self.fh.readline(self.piece_bytes)
        self.ended = not more or more.endswith(b"\n")
        return more

    def pieces(self) -> Iterator[str]:
        data = self.head.lstrip()
        self.head = b""
        if not data.startswith(b'"'):
            raise FormatError("A long line of the dataset file is not a JSON string.")
        data = data[1:]
        while True:
            k = _JSON_UNITS.match(data).end()
            if data[k : k + 1] == b'"':  # the closing quote
                if k:
                    yield _json_piece(data[:k])
                return
            if len(data) - k >= 6:  # not an escape cut by the read: a malformed one
                raise FormatError("A long line of the dataset file holds an invalid escape.")
            k = _whole_chars(data, k)
            if k:
                yield _json_piece(data[:k])
            data = data[k:]
            if self.ended:
                raise FormatError("A long line of the dataset file ends inside its text.")
            data += self._read()

    def skip_rest(self) -> None:
        while not self.ended:
            self._read()


def _whole_chars(data: bytes, k: int) -> int:
    """`k`, moved back so that data[:k] ends neither inside a UTF-8 character nor between the
    two halves (\\uD8xx\\uDCxx) of an escaped surrogate pair."""
    j = k
    while j > 0 and k - j < 4 and 0x80 <= data[j - 1] < 0xC0:  # continuation bytes
        j -= 1
    if j > 0 and data[j - 1] >= 0xC0:  # a lead byte: is its character complete?
        need = 2 if data[j - 1] < 0xE0 else 3 if data[j - 1] < 0xF0 else 4
        if k - (j - 1) < need:
            k = j - 1
    if k >= 6 and _HIGH_SURROGATE.fullmatch(data, k - 6, k):
        run = 0  # backslashes before the escape: an even run leaves it an escape
        while k - 7 - run >= 0 and data[k - 7 - run] == 0x5C:
            run += 1
        if run % 2 == 0:
            k -= 6
    return k


def _json_piece(raw: bytes) -> str:
    return json.loads(b'"' + raw + b'"')
