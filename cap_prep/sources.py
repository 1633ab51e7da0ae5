"""Input files: expanding a dataset's glob and streaming its documents.

Formats (by extension, case-insensitive):
- `.txt`     the whole file is one document;
- `.json`    a list of objects, each with a string "text" (a file of JSON lines is accepted too);
- `.jsonl`   one object with a string "text" per line (blank lines are skipped);
- `.parquet` a string column "text", one document per row.
A dataset of conversations (chat.py) reads the same files with another `extract`: each JSON object
or Parquet row is handed to it (with where it is), and what it returns is the document.
Files are read as strict UTF-8 (a leading byte-order mark is ignored). Every problem is a CapError
naming the file and, where there is one, the line or record. Every format is streamed: `.jsonl`
line by line, `.parquet` in row batches, `.json` one list element at a time (json.JSONDecoder.
raw_decode over a buffer that grows geometrically while a value is incomplete), and a `.txt` file
above `stream_above` bytes is handed on as blocks of text (incremental UTF-8 decoding), so memory
holds one record's text at most, never a whole file.
Over 300 lines because each of the four formats needs its own streaming reader and its own
line- or record-precise error messages.
"""

from __future__ import annotations

import codecs
import glob
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from cap_common.errors import CapError

FORMATS = (".txt", ".json", ".jsonl", ".parquet")
PARQUET_BATCH_ROWS = 4096
READ_BYTES = 1 << 20  # .txt / .json read size (a .json read doubles while one value is incomplete)
_JSON_SLACK = 64  # characters a .json value must end before the end of what was read
_JSON_WS = re.compile(r"[ \t\n\r]*")
_LINE_BREAK = re.compile("\r\n|[\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029]")


@dataclass(frozen=True)
class InputFile:
    """One matched input file: absolute resolved path and its size and identity at stat time."""

    path: Path
    size: int
    mtime_ns: int
    inode: int

    @property
    def format(self) -> str:
        return self.path.suffix.lower()


def find_files(pattern: str, where: str, text_column: bool = True) -> list[InputFile]:
    """The files a dataset_path glob matches (sorted by path); `where` names the config key.
    `text_column`: check now that every .parquet file has a string column "text"."""
    files, seen = [], set()
    for raw in sorted(glob.glob(pattern, recursive=True)):
        p = Path(raw).resolve()
        if p in seen or p.is_dir():
            continue
        seen.add(p)
        if p.suffix.lower() not in FORMATS:
            raise CapError(f"{where}: {raw}: unsupported file type '{p.suffix}' (expected {', '.join(FORMATS)})")
        try:
            st = p.stat()
        except OSError as e:
            raise CapError(f"{where}: {raw}: cannot read ({e.strerror})") from None
        files.append(InputFile(p, st.st_size, st.st_mtime_ns, st.st_ino))
    files.sort(key=lambda f: str(f.path))
    if not files:
        raise CapError(f"{where} = '{pattern}': no files match")
    if text_column and any(f.format == ".parquet" for f in files):
        for f in files:
            if f.format == ".parquet":
                _parquet_text_column(f.path)
    return files


def read_documents(f: InputFile, stream_above: int | None = None, extract=None) -> Iterator[tuple[object, int]]:
    """Yield (document, input bytes consumed since the previous yield) for each document of `f`.

    A document is its text, except a `.txt` file of more than `stream_above` bytes: an iterable of
    its text in blocks (iterate it before asking for the next document). `extract(record, where)`
    makes the document of a JSON object or Parquet row (default: its "text" string); it may have
    `columns(names)`, the Parquet columns it reads of those a file has.
    """
    if f.format == ".txt":
        return _read_txt(f, stream_above)
    if f.format == ".parquet":
        return _read_parquet(f, extract)
    return {".json": _read_json, ".jsonl": _read_jsonl}[f.format](f, extract or _text_of)


# ---------------------------------------------------------------- per format
def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise CapError(f"{path}: cannot read ({e.strerror})") from None


def _open(path: Path):
    try:
        return open(path, "rb")
    except OSError as e:
        raise CapError(f"{path}: cannot read ({e.strerror})") from None


def _utf8_error(where: str, e: UnicodeDecodeError, offset: int = 0) -> CapError:
    """The message for invalid UTF-8 at byte `offset + e.start` of the file or line."""
    return CapError(f"{where}: not valid UTF-8 (byte {offset + e.start}: {e.object[e.start : e.start + 1]!r})")


def _decode(data: bytes, where: str) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _utf8_error(where, e) from None
    return text[1:] if text.startswith("\ufeff") else text


class _Utf8:
    """A file's text as strict UTF-8, decoded incrementally block by block, its leading BOM dropped.

    `read(n)` reads n more bytes and returns at least one character, or "" at the end of the file;
    an invalid byte is a CapError naming its offset in the file.
    """

    def __init__(self, path: Path):
        self.path, self.handle = path, _open(path)
        self.decoder = codecs.getincrementaldecoder("utf-8")("strict")
        self.offset, self.eof, self.started = 0, False, False

    def read(self, nbytes: int) -> str:
        while not self.eof:
            try:
                data = self.handle.read(nbytes)
            except OSError as e:
                raise CapError(f"{self.path}: cannot read ({e.strerror})") from None
            pending = len(self.decoder.getstate()[0])  # bytes of a character cut by the last block
            try:
                text = self.decoder.decode(data, final=not data)
            except UnicodeDecodeError as e:
                raise _utf8_error(str(self.path), e, self.offset - pending) from None
            self.offset += len(data)
            self.eof = not data
            if text and not self.started:
                self.started = True
                text = text[1:] if text[0] == "\ufeff" else text
            if text:
                return text
        return ""

    def drain(self) -> None:
        """Decode the rest of the file (an invalid byte there is the error to report)."""
        while self.read(READ_BYTES):
            pass

    def blocks(self) -> Iterator[str]:
        with self.handle:
            while text := self.read(READ_BYTES):
                yield text


def _text_of(record, where: str, name: str = "text") -> str:
    if not isinstance(record, dict):
        raise CapError(f"{where}: expected an object with a \"{name}\" string, got {type(record).__name__}")
    if name not in record:
        keys = ", ".join(list(record)[:5]) or "none"
        raise CapError(f"{where}: no \"{name}\" key (keys: {keys})")
    text = record[name]
    if not isinstance(text, str):
        raise CapError(f"{where}: \"{name}\" is {type(text).__name__}, expected a string")
    return text


def _read_txt(f: InputFile, stream_above: int | None):
    if stream_above is not None and f.size > stream_above:
        yield _Utf8(f.path).blocks(), f.size
    else:
        yield _decode(_read_bytes(f.path), str(f.path)), f.size


class _Malformed(CapError):
    """Malformed JSON (reported once the rest of the file is known to be valid UTF-8)."""


class _JsonText:
    """The text of a .json file, read on demand: buf[pos:] is what is not parsed yet. The line and
    column of buf[0] are kept (buf drops its parsed part when it reads more) for messages."""

    def __init__(self, chars: _Utf8):
        self.chars, self.buf, self.pos = chars, "", 0
        self.line, self.column = 1, 0  # of buf[0]: 1-based line, characters before it on its line
        self.decoder = json.JSONDecoder()

    def more(self, nbytes: int) -> bool:
        """Read on (dropping the parsed part first); False at the end of the file."""
        self.drop_parsed()
        text = self.chars.read(nbytes)
        self.buf += text
        return bool(text)

    def drop_parsed(self) -> None:
        lines = self.buf.count("\n", 0, self.pos)
        if lines:
            self.line += lines
            self.column = self.pos - self.buf.rfind("\n", 0, self.pos) - 1
        else:
            self.column += self.pos
        self.buf, self.pos = self.buf[self.pos :], 0

    def peek(self) -> str:
        """Skip whitespace; the next character, or "" at the end of the file."""
        while True:
            self.pos = _JSON_WS.match(self.buf, self.pos).end()
            if self.pos < len(self.buf) or not self.more(READ_BYTES):
                return self.buf[self.pos : self.pos + 1]

    def value(self):
        """Decode the JSON value at the cursor, reading more while it may be incomplete.

        A decoded value is final unless it is a number ending less than _JSON_SLACK characters
        before the end of what is read (a number cut by the block looks complete) and the file
        goes on; an error is final when the file ends or it lies before that margin and is not an
        unterminated string (the one error reported before the point where the text ran out).
        Reads grow geometrically, so one huge value is decoded O(log n) times, not O(n / block).
        """
        nbytes = READ_BYTES
        while True:
            try:
                value, end = self.decoder.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as e:
                if self.chars.eof or not (
                    e.msg.startswith("Unterminated string") or e.pos >= len(self.buf) - _JSON_SLACK
                ):
                    raise self.malformed(e.msg, e.pos) from None
            else:
                number = isinstance(value, (int, float)) and not isinstance(value, bool)
                if not number or self.chars.eof or end <= len(self.buf) - _JSON_SLACK:
                    self.pos = end  # only a number can end where the text read so far ends
                    if end > 4 * READ_BYTES:
                        self.drop_parsed()  # a huge value: let its JSON text go now
                    return value
                del value
            self.more(nbytes)
            nbytes *= 2

    def malformed(self, msg: str, pos: int | None = None) -> CapError:
        """json.loads's message for an error at buf[pos] (default: the cursor), in file lines and columns."""
        e = json.JSONDecodeError(msg, self.buf, self.pos if pos is None else pos)
        column = e.colno + (self.column if e.lineno == 1 else 0)
        return _Malformed(f"{self.chars.path}:{self.line + e.lineno - 1}: malformed JSON ({msg}, column {column})")


def _read_json(f: InputFile, extract):
    """The records of a .json file, streamed, with json.loads's verdict on the whole file: a list
    of objects, or JSON lines if there is more than one top-level value. Errors come in its
    order: invalid UTF-8 anywhere, then malformed JSON, then the first bad record."""
    chars = _Utf8(f.path)
    with chars.handle:
        doc, bad_record = _JsonText(chars), None
        try:
            if doc.more(READ_BYTES) and doc.buf[0] == "\ufeff":  # a second BOM: json.loads refuses it
                raise doc.malformed("Unexpected UTF-8 BOM (decode using utf-8-sig)")
            if doc.peek() != "[":
                value = doc.value()
                if not doc.peek():
                    raise CapError(
                        f"{f.path}: expected a JSON list of objects with a \"text\" string, got {type(value).__name__}"
                    )
                json_lines = True
            else:
                doc.pos += 1
                i, reported = 0, 0
                if doc.peek() != "]":
                    while True:
                        record = doc.value()
                        if bad_record is None:
                            try:
                                text = extract(record, f"{f.path}: record {i}")
                            except CapError as e:
                                bad_record = e  # reported once the rest of the file parses
                            else:
                                del record
                                yield text, chars.offset - reported
                                reported = chars.offset
                                del text
                        i += 1
                        c = doc.peek()
                        if c == "]":
                            break
                        if c != ",":
                            raise doc.malformed("Expecting ',' delimiter")
                        doc.pos += 1
                        doc.peek()
                doc.pos += 1
                json_lines = bool(doc.peek())
        except _Malformed:
            chars.drain()
            raise
    if json_lines:  # more than one top-level value: the file is read again as JSON lines
        yield from _read_json_lines(f, extract)
    elif bad_record is not None:
        raise bad_record


def _split_lines(blocks: Iterable[str]) -> Iterator[str]:
    """The lines of the text in `blocks`, split exactly as str.splitlines() splits the whole text."""
    parts, after_cr = [], False
    for block in blocks:
        if after_cr and block.startswith("\n"):  # the "\n" of a "\r\n" cut by the block
            block = block[1:]
        after_cr, at = False, 0
        for m in _LINE_BREAK.finditer(block):
            parts.append(block[at : m.start()])
            yield "".join(parts)
            parts, at = [], m.end()
            after_cr = m.group() == "\r" and at == len(block)
        if at < len(block):
            parts.append(block[at:])
    if parts:
        yield "".join(parts)


def _read_json_lines(f: InputFile, extract):
    """A .json file of JSON lines, lines as str.splitlines() cuts the text; errors after the rest
    of the file is known to be valid UTF-8."""
    chars = _Utf8(f.path)
    reported = 0
    with chars.handle:
        n = 0
        for line in _split_lines(chars.blocks()):  # (no enumerate: it would keep the last line alive)
            n += 1
            if not line.strip():
                continue
            try:
                text = _line_text(line, f"{f.path}:{n}", extract)
            except CapError:
                chars.drain()
                raise
            del line
            yield text, chars.offset - reported
            reported = chars.offset
            del text


def _line_text(line: str, where: str, extract):
    """The document of one JSON line (`where` = file:line for errors)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise CapError(f"{where}: malformed JSON ({e.msg}, column {e.colno})") from None
    return extract(record, where)


def _read_jsonl(f: InputFile, extract):
    with _open(f.path) as handle:
        pending = n = 0
        for raw in handle:  # (no enumerate: it would keep the last line alive)
            n += 1
            pending += len(raw)
            line = _decode(raw, f"{f.path}:{n}")
            del raw
            if not line.strip():
                continue
            text = _line_text(line, f"{f.path}:{n}", extract)
            del line
            yield text, pending
            pending = 0
            del text


def _parquet_text_column(path: Path):
    """Open a parquet file and check that it has a string column "text"; returns the ParquetFile."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except OSError as e:
        raise CapError(f"{path}: cannot read ({e})") from None
    except (pa.ArrowException, ValueError) as e:
        raise CapError(f"{path}: not a valid Parquet file ({e})") from None
    schema = pf.schema_arrow
    if "text" not in schema.names:
        raise CapError(f"{path}: no \"text\" column (columns: {', '.join(schema.names[:8])})")
    kind = schema.field("text").type
    if not (
        pa.types.is_string(kind)
        or pa.types.is_large_string(kind)
        or getattr(pa.types, "is_string_view", lambda t: False)(kind)
    ):
        raise CapError(f"{path}: column \"text\" has type {kind}, expected string")
    return pf


def _read_parquet(f: InputFile, extract=None):
    """The rows of a .parquet file: their "text" strings, or with `extract` what it makes of each row
    (a dict of the columns it asks for)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if extract is None:
        pf, columns = _parquet_text_column(f.path), ["text"]
    else:
        try:
            pf = pq.ParquetFile(f.path)
        except OSError as e:
            raise CapError(f"{f.path}: cannot read ({e})") from None
        except (pa.ArrowException, ValueError) as e:
            raise CapError(f"{f.path}: not a valid Parquet file ({e})") from None
        names = pf.schema_arrow.names
        try:
            columns = extract.columns(names) if hasattr(extract, "columns") else names
        except CapError as e:
            raise CapError(f"{f.path}: {e}") from None
    total = max(pf.metadata.num_rows, 1)
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=columns):
            if extract is None:
                column = batch.column(0)
                if column.null_count:
                    first = row + column.is_null().to_numpy(zero_copy_only=False).argmax()
                    raise CapError(f"{f.path}: record {first}: \"text\" is null, expected a string")
            try:
                records = batch.column(0).to_pylist() if extract is None else batch.to_pylist()
            except UnicodeDecodeError:
                raise CapError(f"{f.path}: records {row}-{row + batch.num_rows - 1}: not valid UTF-8") from None
            share = f.size * len(records) // total
            for i, record in enumerate(records):
                doc = record if extract is None else extract(record, f"{f.path}: record {row + i}")
                yield doc, share if i == 0 else 0
            row += len(records)
    except (pa.ArrowException, OSError) as e:
        raise CapError(f"{f.path}: cannot read record {row} ({e})") from None
