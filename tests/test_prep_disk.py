"""cap-prep and the file system, through the real command: a full disk or a file-size limit is one
line and exit code 2 with nothing left behind; the folders it makes follow the umask."""

from __future__ import annotations

import os
import resource
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import transformers

from tests.test_prep import L, documents, reference_tokens, write_all_formats, write_config

REPO = Path(__file__).resolve().parents[1]


def cap_prep(config: Path, preexec=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cap_prep.cli", str(config)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=preexec,
    )


def file_size_limit(n: int):
    """For preexec_fn: files can grow to n bytes, and a write beyond fails with EFBIG (not SIGXFSZ)."""

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (n, n))

    return limit


def assert_clean_failure(result, expected: list[str], leftovers: Path, nothing_under: Path) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cap-prep: error: "), result.stderr
    assert "Traceback" not in result.stderr
    for part in expected:
        assert part in lines[0], lines[0]
    assert not leftovers.exists() or list(nothing_under.iterdir()) == []


@pytest.fixture
def dataset(tmp_path, tiny_model_dir):
    """A dataset of ~1.5 MB (~300k tokens), and the number of tokens cap-prep stores for it."""
    docs = documents(4500, seed=21)
    write_all_formats(tmp_path / "data", docs)
    tok = transformers.AutoTokenizer.from_pretrained(tiny_model_dir("llama"))
    return sum(len(reference_tokens(tok, d, None)) for d in docs)


@pytest.mark.parametrize("where", ["token store", "shards"])
def test_file_size_limit_is_one_line_and_leaves_nothing(where, dataset, tmp_path, tiny_model_dir):
    tokens = dataset
    # the token store is 4 bytes a token; the one shard ~5 bytes a token position (L / (L - 1) per token)
    limit = tokens * 2 if where == "token store" else tokens * 4 + (tokens * 5 * L // (L - 1) - tokens * 4) // 2
    config = write_config(
        tmp_path, tiny_model_dir("llama"), [{"dataset_path": "data/*"}], prepared_dir="out/nested/prepared"
    )
    result = cap_prep(config, file_size_limit(limit))
    name = "tokens.tmp" if where == "token store" else "train-00000.arrow"
    assert_clean_failure(result, [name, "cannot write", "File too large"], tmp_path / "out", tmp_path / "out")
    assert not (tmp_path / "out").exists()  # not even the folders cap-prep made for it


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (needs root and mount); skipped where it cannot be mounted."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    except OSError as e:
        pytest.skip(f"cannot mount a tmpfs ({e})")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs ({done.stderr.decode().strip()})")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


def test_disk_full_is_one_line_and_leaves_nothing(dataset, small_disk, tmp_path, tiny_model_dir):
    assert dataset * 4 > 1 << 20  # the token store alone does not fit
    config = write_config(
        tmp_path, tiny_model_dir("llama"), [{"dataset_path": "data/*"}], prepared_dir=str(small_disk / "a" / "prepared")
    )
    result = cap_prep(config)
    assert_clean_failure(result, [str(small_disk), "No space left on device"], small_disk, small_disk)
    assert list(small_disk.iterdir()) == []  # no lock, no temp folder, no "a/prepared"


@pytest.mark.parametrize("mask", [0o022, 0o027], ids=["umask 022", "umask 027"])
def test_folders_and_files_follow_the_umask(mask, tmp_path, tiny_model_dir):
    write_all_formats(tmp_path / "data", documents(30, seed=22))
    config = write_config(tmp_path, tiny_model_dir("llama"), [{"dataset_path": "data/*"}])
    result = cap_prep(config, lambda: os.umask(mask))
    assert result.returncode == 0, result.stderr
    folder = Path(result.stdout.strip().splitlines()[-1])
    made = [tmp_path / "out", tmp_path / "out" / "prepared", folder]
    assert folder.parent == tmp_path / "out" / "prepared"
    for d in made:
        assert stat.S_IMODE(d.stat().st_mode) == 0o777 & ~mask, d
    for f in list(folder.iterdir()) + [folder.parent / ".file-hashes.json"]:
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~mask, f
    assert sorted(p.name for p in folder.parent.iterdir()) == [".file-hashes.json", folder.name]
