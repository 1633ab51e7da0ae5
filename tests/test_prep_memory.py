"""cap-prep's peak memory on one long document, measured on the real command (the child's ru_maxrss).

Before windowed tokenization a 50 MB document took 11 GB (the tokenizer's encoding of the whole
text); now the document's size hardly matters. benchmarks/bench_prep_memory.py measures 1 GB
inputs and 200 MB documents.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks.bench_prep_memory import run_measured
from tests.test_prep import write_config
from tests.test_prep_windows import make_text

REPO = Path(__file__).resolve().parents[1]
MB = 20  # megabytes per document
PEAK_BOUND_MB = 1024


def run_cap_prep(config: Path) -> tuple[int, str, str, float]:
    """(exit code, stdout, stderr, peak RSS in MB) of `cap-prep config`."""
    out_path, err_path = config.with_suffix(".out"), config.with_suffix(".err")
    with open(out_path, "w") as out, open(err_path, "w") as err:
        code, peak = run_measured([sys.executable, "-m", "cap_prep.cli", str(config)], cwd=REPO, stdout=out, stderr=err)
    return code, out_path.read_text(), err_path.read_text(), peak


def one_document(megabytes: int) -> str:
    block = make_text(0, 1 << 20)  # 1 MiB of sentences, space and newline runs, unicode
    rng = np.random.default_rng(0)
    return "".join(block[rng.integers(0, 1 << 19) :] for _ in range(2 * megabytes))[: megabytes << 20]


@pytest.mark.parametrize("fmt", ["jsonl", "txt"])
def test_one_long_document_in_bounded_memory(fmt, tmp_path, tiny_model_dir):
    doc = one_document(MB)
    (tmp_path / "data").mkdir()
    if fmt == "jsonl":
        (tmp_path / "data" / "doc.jsonl").write_text(json.dumps({"text": doc}) + "\n")
    else:
        (tmp_path / "data" / "doc.txt").write_text(doc)
    config = write_config(tmp_path, tiny_model_dir("llama"), [{"dataset_path": "data/*"}], sequence_len=2048)
    code, out, err, peak = run_cap_prep(config)
    assert code == 0, err
    manifest = json.loads((Path(out.strip().splitlines()[-1]) / "manifest.json").read_text())
    assert manifest["datasets"][0]["documents"] == 1
    assert manifest["splits"]["train"]["tokens"] > len(doc) // 8
    print(f"cap-prep peak RSS {peak:.0f} MB for a {MB} MB .{fmt} document")
    assert peak < PEAK_BOUND_MB, f"peak RSS {peak:.0f} MB for a {MB} MB document"
