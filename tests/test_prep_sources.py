"""Streamed input files read exactly as the whole-file rule does: same documents, same error line.

The reference below is the documented rule applied to a whole file (strict UTF-8, a leading BOM
dropped, json.loads of the whole text, JSON lines when it finds extra data, the text split by
str.splitlines()); cap-prep reads .json one value at a time and .txt in blocks, here with blocks of
a few bytes so that characters, escapes, numbers and lines are cut everywhere.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from cap_common.errors import CapError
from cap_prep import sources
from cap_prep.sources import InputFile, _split_lines, _text_of, read_documents


def whole_file_json(path: Path) -> list[str]:
    """The documents of a .json file by the rule, from its whole text."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CapError(f"{path}: not valid UTF-8 (byte {e.start}: {data[e.start : e.start + 1]!r})") from None
    text = text[1:] if text.startswith("\ufeff") else text
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg != "Extra data":
            raise CapError(f"{path}:{e.lineno}: malformed JSON ({e.msg}, column {e.colno})") from None
        docs = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise CapError(f"{path}:{n}: malformed JSON ({e.msg}, column {e.colno})") from None
                docs.append(_text_of(record, f"{path}:{n}"))
        return docs
    if not isinstance(records, list):
        raise CapError(f"{path}: expected a JSON list of objects with a \"text\" string, got {type(records).__name__}")
    return [_text_of(r, f"{path}: record {i}") for i, r in enumerate(records)]


def input_file(path: Path) -> InputFile:
    st = path.stat()
    return InputFile(path, st.st_size, st.st_mtime_ns, st.st_ino)


def outcome(read, path: Path):
    try:
        return "documents", read(path)
    except CapError as e:
        return "error", str(e)


def streamed(path: Path) -> list[str]:
    return [doc if isinstance(doc, str) else "".join(doc) for doc, _ in read_documents(input_file(path), 0)]


PIECES = list('[]{},:" \n\r\t\\0123456789.eE-+truefalsn') + [
    '"text"',
    '{"text": "',
    '"}',
    "\u2028",
    "é",
    "🙂",
    "\ufeff",
    "\x85",
    "\\u00e9",
    "\\ud83d",
    "\\ude42",
    "\\n",
]


def random_json_file(rng: random.Random) -> bytes:
    """A list or JSON lines of records, mutated now and then; or just noise; sometimes bad UTF-8 or a BOM."""
    if rng.random() < 0.7:
        records = [
            {"text": "".join(rng.choice(PIECES) for _ in range(rng.randint(0, 30))), "n": i}
            for i in range(rng.randint(0, 6))
        ]
        if rng.random() < 0.5:
            text = json.dumps(records, indent=rng.choice([None, 1]), ensure_ascii=rng.random() < 0.5)
        else:
            text = "\n".join(json.dumps(r, ensure_ascii=rng.random() < 0.5) for r in records)
            text += rng.choice(["", "\n", "\n\n", "\r\n"])
        chars = list(text)
        for _ in range(rng.choice([0, 0, 1, 2])):
            k = rng.randrange(len(chars) + 1)
            op = rng.random()
            if op < 0.4 and k < len(chars):
                del chars[k]
            elif op < 0.8:
                chars.insert(k, rng.choice(PIECES))
            elif k < len(chars):
                chars[k] = rng.choice(PIECES)
        text = "".join(chars)
    else:
        text = "".join(rng.choice(PIECES) for _ in range(rng.randint(0, 40)))
    data = text.encode("utf-8", "surrogatepass")
    if rng.random() < 0.05:
        data = b"\xef\xbb\xbf" + data
    if rng.random() < 0.05 and data:
        k = rng.randrange(len(data))
        data = data[:k] + bytes([rng.choice([0xFF, 0xC3, 0x80])]) + data[k:]
    return data


def test_json_streamed_as_the_whole_file_rule(tmp_path, monkeypatch):
    rng = random.Random(0)
    path = tmp_path / "a.json"
    kinds = set()
    for case in range(1500):
        path.write_bytes(random_json_file(rng))
        monkeypatch.setattr(sources, "READ_BYTES", rng.choice([1, 2, 3, 7, 64, 1 << 20]))
        expected = outcome(whole_file_json, path)
        assert outcome(streamed, path) == expected, (case, path.read_bytes())
        kinds.add(expected[0] if expected[0] == "documents" else expected[1].split(":")[-1][:20])
    assert len(kinds) > 8  # documents and many kinds of errors were compared


def test_txt_streamed_as_the_whole_file_rule(tmp_path, monkeypatch):
    rng = random.Random(1)
    path = tmp_path / "a.txt"
    pieces = ["a", "é", "🙂", "\ufeff", "\r", "\n", "\r\n", "\u2028", "日"]
    for case in range(800):
        data = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 30))).encode()
        if rng.random() < 0.3:
            data = b"\xef\xbb\xbf" + data
        if rng.random() < 0.3 and data:
            k = rng.randrange(len(data) + 1)
            data = data[:k] + bytes([rng.choice([0xFF, 0xC3, 0x80, 0xF0])]) + data[k:]
        path.write_bytes(data)
        monkeypatch.setattr(sources, "READ_BYTES", rng.choice([1, 2, 3, 5, 100]))
        try:
            expected = "documents", [sources._decode(data, str(path))]
        except CapError as e:
            expected = "error", str(e)
        assert outcome(streamed, path) == expected, (case, data)
        ((doc, size),) = read_documents(input_file(path), 0)
        assert isinstance(doc, str) == (len(data) == 0) and size == len(data)  # above stream_above: blocks


def test_lines_split_as_splitlines():
    rng = random.Random(2)
    for _ in range(500):
        text = "".join(
            rng.choice(["a", "\r", "\n", "\r\n", "\x0b", "\x1e", "\x85", "\u2028", "bc"])
            for _ in range(rng.randint(0, 25))
        )
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(0, 6))))
        blocks = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        assert list(_split_lines(blocks)) == text.splitlines(), blocks


@pytest.mark.parametrize("size", [3_000_000])
def test_one_huge_json_value_is_read_in_few_passes(size, tmp_path, monkeypatch):
    """A value far larger than a read is decoded O(log n) times (reads double), not O(n / read)."""
    monkeypatch.setattr(sources, "READ_BYTES", 1 << 10)
    doc = "word \\ \n" * (size // 8)
    path = tmp_path / "a.json"
    path.write_text(json.dumps([{"text": "small"}, {"text": doc}, {"text": "last"}]))
    calls = []
    decode = json.JSONDecoder.raw_decode

    def counted(self, s, idx=0):
        calls.append(len(s))
        return decode(self, s, idx)

    monkeypatch.setattr(json.JSONDecoder, "raw_decode", counted)
    assert streamed(path) == ["small", doc, "last"]
    assert len(calls) < 30 and sum(calls) < 8 * len(json.dumps(doc))
