"""cap-prep on bad input: exit code 2, one line naming the file and place, and nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from cap_prep.cli import main
from tests.test_prep import documents, write_config


def _bytes(name, data):
    return lambda d: (d / name).write_bytes(data)


def _text(name, text):
    return lambda d: (d / name).write_text(text)


def _parquet(name, table):
    return lambda d: pq.write_table(table, d / name)


def _broken_link(d):
    (d / "gone.txt").symlink_to(d / "missing-target.txt")


GOOD = json.dumps([{"text": "Fine."}])

# (files written into data/, dataset table, global keys, what the one error line must contain)
CASES = {
    "glob matches nothing": (
        _text("a.json", GOOD),
        {"dataset_path": "data/*.jsonl"},
        {},
        ["datasets[0].dataset_path", "data/*.jsonl", "no files match"],
    ),
    "unsupported type": (_text("a.csv", "text\nhi\n"), {}, {}, ["a.csv", "unsupported file type"]),
    "unreadable file": (_broken_link, {}, {}, ["gone.txt", "cannot read"]),
    "non-UTF-8 txt": (_bytes("a.txt", b"caf\xe9 au lait"), {}, {}, ["a.txt", "not valid UTF-8", "byte 3"]),
    "non-UTF-8 jsonl line": (
        _bytes("a.jsonl", b'{"text": "ok"}\n{"text": "bad \xff"}\n'),
        {},
        {},
        ["a.jsonl:2", "not valid UTF-8"],
    ),
    "malformed json": (_text("a.json", '[{"text": "a"},\n {"text": "b",}\n]'), {}, {}, ["a.json:2", "malformed JSON"]),
    "malformed jsonl": (_text("a.jsonl", '{"text": "a"}\n\n{"text": "b"\n'), {}, {}, ["a.jsonl:3", "malformed JSON"]),
    "json not a list": (_text("a.json", '{"text": "a"}'), {}, {}, ["a.json", "expected a JSON list"]),
    "record without text": (
        _text("a.json", json.dumps([{"text": "a"}, {"body": "b"}])),
        {},
        {},
        ["a.json: record 1", 'no "text" key', "body"],
    ),
    "text not a string": (
        _text("a.jsonl", '{"text": "a"}\n{"text": 5}\n'),
        {},
        {},
        ["a.jsonl:2", '"text" is int', "expected a string"],
    ),
    "parquet without text": (
        _parquet("a.parquet", pa.table({"body": ["a"]})),
        {},
        {},
        ["a.parquet", 'no "text" column', "body"],
    ),
    "parquet null text": (
        _parquet("a.parquet", pa.table({"text": ["a", None]})),
        {},
        {},
        ["a.parquet: record 1", "null"],
    ),
    "empty dataset": (
        _text("a.jsonl", '{"text": ""}\n{"text": ""}\n'),
        {},
        {},
        ["datasets[0]", "no documents left", "2 empty"],
    ),
    "sequence_len below prefix + 1": (
        _text("a.json", GOOD),
        {},
        {"sequence_len": 3, "sequence_prefix": [5, 6, 7]},
        ["sequence_len = 3", "at least 4"],
    ),
    "suffix id out of vocabulary": (
        _text("a.json", GOOD),
        {"document_suffix": [1, 100000]},
        {},
        ["datasets[0]: document_suffix", "100000", "out of the tokenizer's vocabulary"],
    ),
    "prefix id out of vocabulary": (
        _text("a.json", GOOD),
        {},
        {"sequence_prefix": 99999},
        ["sequence_prefix", "99999", "vocabulary"],
    ),
    "mask id out of vocabulary": (_text("a.json", GOOD), {}, {"mask_tokens": [1, 4096]}, ["mask_tokens", "4096"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_exit_2(case, tmp_path, tiny_model_dir):
    setup, table, keys, expected = CASES[case]
    (tmp_path / "data").mkdir()
    setup(tmp_path / "data")
    config = write_config(tmp_path, tiny_model_dir("llama"), [{"dataset_path": "data/*", **table}], **keys)
    result = CliRunner().invoke(main, [str(config)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cap-prep: error: "), result.stderr
    for part in expected:
        assert part in lines[0]
    assert not (tmp_path / "out").exists()  # nothing written, not even the folders


def test_error_after_files_were_read_leaves_nothing(tmp_path, tiny_model_dir):
    """A bad record in the second dataset, found after the first was tokenized and stored."""
    (tmp_path / "good").mkdir()
    (tmp_path / "good" / "a.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in documents(50, seed=1)))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "b.jsonl").write_text('{"text": "a"}\n{"text": null}\n')
    (tmp_path / "prepared").mkdir()
    config = write_config(
        tmp_path,
        tiny_model_dir("llama"),
        [{"dataset_path": "good/*.jsonl"}, {"dataset_path": "bad/*.jsonl"}],
        prepared_dir="prepared",
    )
    result = CliRunner().invoke(main, [str(config)])
    assert result.exit_code == 2 and "b.jsonl:2" in result.stderr
    assert list((tmp_path / "prepared").iterdir()) == []  # no lock, no temp folder, no hash cache


def test_cli_builds_then_reuses(tmp_path, tiny_model_dir):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.json").write_text(json.dumps([{"text": t} for t in documents(20, seed=2)]))
    config = write_config(tmp_path, tiny_model_dir("llama"), [{"dataset_path": "data/*.json"}], eval_fraction=0.1)
    first = CliRunner().invoke(main, [str(config)])
    assert first.exit_code == 0, first.output
    folder = first.stdout.strip().splitlines()[-1]
    assert "docs train" in first.stdout and Path(folder).parent == tmp_path / "out" / "prepared"
    second = CliRunner().invoke(main, [str(config), "--add-prefix-space"])
    assert second.exit_code == 0 and second.stdout.strip().splitlines()[-1] != folder  # a prep key changed
    third = CliRunner().invoke(main, [str(config)])
    assert "reusing" in third.stdout and third.stdout.strip().splitlines()[-1] == folder
    assert "config reference" in CliRunner().invoke(main, ["--help"]).stdout
