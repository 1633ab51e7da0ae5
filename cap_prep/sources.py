"""Input files: expanding a dataset's glob and streaming its documents.

Formats (by extension, case-insensitive):
- `.txt`     the whole file is one document;
- `.json`    a list of objects, each with a string "text" (a file of JSON lines is accepted too);
- `.jsonl`   one object with a string "text" per line (blank lines are skipped);
- `.parquet` a string column "text", one document per row.
Files are read as strict UTF-8 (a leading byte-order mark is ignored). Every problem is a CapError
naming the file and, where there is one, the line or record. `.jsonl` and `.parquet` are streamed;
`.txt` and `.json` files are read whole, so very large inputs belong in `.jsonl` or `.parquet`.
"""
from __future__ import annotations

import glob
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from common.errors import CapError

FORMATS = (".txt", ".json", ".jsonl", ".parquet")
PARQUET_BATCH_ROWS = 4096


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


def find_files(pattern: str, where: str) -> list[InputFile]:
    """The files a dataset_path glob matches (sorted by path); `where` names the config key."""
    files, seen = [], set()
    for raw in sorted(glob.glob(pattern, recursive=True)):
        p = Path(raw).resolve()
        if p in seen or p.is_dir():
            continue
        seen.add(p)
        if p.suffix.lower() not in FORMATS:
            raise CapError(f"{where}: {raw}: unsupported file type '{p.suffix}' "
                           f"(expected {', '.join(FORMATS)})")
        try:
            st = p.stat()
        except OSError as e:
            raise CapError(f"{where}: {raw}: cannot read ({e.strerror})") from None
        files.append(InputFile(p, st.st_size, st.st_mtime_ns, st.st_ino))
    files.sort(key=lambda f: str(f.path))
    if not files:
        raise CapError(f"{where} = '{pattern}': no files match")
    if any(f.format == ".parquet" for f in files):
        for f in files:
            if f.format == ".parquet":
                _parquet_text_column(f.path)
    return files


def read_documents(f: InputFile) -> Iterator[tuple[str, int]]:
    """Yield (text, input bytes consumed since the previous yield) for each document of `f`."""
    reader = {".txt": _read_txt, ".json": _read_json, ".jsonl": _read_jsonl, ".parquet": _read_parquet}[f.format]
    return reader(f)


# ---------------------------------------------------------------- per format
def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise CapError(f"{path}: cannot read ({e.strerror})") from None


def _decode(data: bytes, where: str) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CapError(f"{where}: not valid UTF-8 (byte {e.start}: {data[e.start:e.start + 1]!r})") from None
    return text[1:] if text.startswith("\ufeff") else text


def _text_of(record, where: str) -> str:
    if not isinstance(record, dict):
        raise CapError(f"{where}: expected an object with a \"text\" string, got {type(record).__name__}")
    if "text" not in record:
        keys = ", ".join(list(record)[:5]) or "none"
        raise CapError(f"{where}: no \"text\" key (keys: {keys})")
    text = record["text"]
    if not isinstance(text, str):
        raise CapError(f"{where}: \"text\" is {type(text).__name__}, expected a string")
    return text


def _read_txt(f: InputFile):
    yield _decode(_read_bytes(f.path), str(f.path)), f.size


def _read_json(f: InputFile):
    text = _decode(_read_bytes(f.path), str(f.path))
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # JSON lines in a .json file
            yield from _read_json_lines(text.splitlines(), f)
            return
        raise CapError(f"{f.path}:{e.lineno}: malformed JSON ({e.msg}, column {e.colno})") from None
    if not isinstance(records, list):
        raise CapError(f"{f.path}: expected a JSON list of objects with a \"text\" string, "
                       f"got {type(records).__name__}")
    for i, record in enumerate(records):
        yield _text_of(record, f"{f.path}: record {i}"), f.size if i == len(records) - 1 else 0


def _read_json_lines(lines, f: InputFile):
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise CapError(f"{f.path}:{n}: malformed JSON ({e.msg}, column {e.colno})") from None
            yield _text_of(record, f"{f.path}:{n}"), len(line) + 1


def _read_jsonl(f: InputFile):
    try:
        handle = open(f.path, "rb")
    except OSError as e:
        raise CapError(f"{f.path}: cannot read ({e.strerror})") from None
    with handle:
        pending = 0
        for n, raw in enumerate(handle, 1):
            pending += len(raw)
            line = _decode(raw, f"{f.path}:{n}")
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise CapError(f"{f.path}:{n}: malformed JSON ({e.msg}, column {e.colno})") from None
            yield _text_of(record, f"{f.path}:{n}"), pending
            pending = 0


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
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)
            or getattr(pa.types, "is_string_view", lambda t: False)(kind)):
        raise CapError(f"{path}: column \"text\" has type {kind}, expected string")
    return pf


def _read_parquet(f: InputFile):
    import pyarrow as pa

    pf = _parquet_text_column(f.path)
    total = max(pf.metadata.num_rows, 1)
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=["text"]):
            column = batch.column(0)
            if column.null_count:
                first = row + column.is_null().to_numpy(zero_copy_only=False).argmax()
                raise CapError(f"{f.path}: record {first}: \"text\" is null, expected a string")
            try:
                texts = column.to_pylist()
            except UnicodeDecodeError:
                raise CapError(f"{f.path}: records {row}-{row + len(column) - 1}: not valid UTF-8") from None
            share = f.size * len(texts) // total
            for i, text in enumerate(texts):
                yield text, share if i == 0 else 0
            row += len(texts)
    except (pa.ArrowException, OSError) as e:
        raise CapError(f"{f.path}: cannot read record {row} ({e})") from None
