"""The build lock: created complete in one step, and taken over at once when no live process can own it."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cap_common.config import load_config
from cap_common.files import HOST
from cap_prep import dataset_folder
from cap_prep import lock as locks
from cap_prep.lock import BuildLock
from tests.test_prep import documents, write_all_formats, write_config

REPO = Path(__file__).resolve().parents[1]


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


LOCKS = {
    "empty": (lambda: b"", "(empty)"),
    "dead pid on this host": (
        lambda: json.dumps({"host": HOST, "pid": dead_pid(), "nonce": "x", "time": 0}).encode(),
        "is not running)",
    ),
}


@pytest.mark.parametrize("case", list(LOCKS))
def test_lock_no_live_process_owns_is_taken_over_at_once(case, tmp_path, tiny_model_dir):
    """A lock left by a crash (an old cap-prep's empty lock on a full disk, a killed builder) costs no wait."""
    write_all_formats(tmp_path / "data", documents(20, seed=30))
    config = write_config(tmp_path, tiny_model_dir("llama"), [{"dataset_path": "data/*"}])
    folder = dataset_folder(load_config(config))
    folder.parent.mkdir(parents=True)
    content, why = LOCKS[case]
    lock = folder.parent / f"{folder.name}.lock"
    lock.write_bytes(content())
    t0 = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "cap_prep.cli", str(config)], cwd=REPO, capture_output=True, text=True, timeout=100
    )
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - t0 < 60  # far from the 120 s staleness wait
    assert f"removed the stale lock {lock}" in result.stdout and why in result.stdout
    assert sorted(p.name for p in folder.parent.iterdir()) == [".file-hashes.json", folder.name]


@pytest.mark.parametrize(
    "content", [b"", b"  \n", b"\x00\x00garbage", b'{"host": "h"}', b'[1, 2]', b'{"host": "h", "pid": "12"}']
)
def test_invalid_lock_is_stale_after_a_second(content, tmp_path, monkeypatch):
    """Empty, not JSON, or not {host: str, pid: int}: no live cap-prep holds it (INVALID_GRACE_S covers
    the instant between O_EXCL and the write on filesystems without hard links)."""
    monkeypatch.setattr(locks, "INVALID_GRACE_S", 0.2)
    path = tmp_path / "fp.lock"
    path.write_bytes(content)
    lock = BuildLock(path)
    assert lock.break_if_stale() is None and path.exists()
    time.sleep(0.25)
    assert lock.break_if_stale() in ("empty", "not a cap lock file") and not path.exists()


def test_lock_is_written_before_it_exists(tmp_path, monkeypatch):
    """The lock appears complete (hard link of a written temporary); the temporary is gone after."""
    path = tmp_path / "fp.lock"
    seen = []
    link = os.link

    def watch(src, dst):
        seen.append(json.loads(Path(src).read_text()))  # complete before it gets the lock's name
        link(src, dst)

    monkeypatch.setattr(os, "link", watch)
    first, second = BuildLock(path), BuildLock(path)
    assert first.try_acquire() and not second.try_acquire()
    info = json.loads(path.read_text())
    assert info == seen[0] and info["pid"] == os.getpid() and info["host"] == HOST and info["nonce"] == first.nonce
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fp.lock"]
    assert second.break_if_stale() is None  # a live holder on this host
    first.release()
    assert second.try_acquire()
    second.release()
    assert list(tmp_path.iterdir()) == []


def test_lock_without_hard_links(tmp_path, monkeypatch):
    """Where the filesystem has no hard links, O_EXCL and one write make the lock."""

    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    path = tmp_path / "fp.lock"
    first = BuildLock(path)
    assert first.try_acquire() and not BuildLock(path).try_acquire()
    assert json.loads(path.read_text())["nonce"] == first.nonce
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fp.lock"]
    first.release()


def test_other_hosts_lock_waits_for_the_heartbeat_rule(tmp_path, monkeypatch):
    """Another host's lock is only judged by its heartbeat: kept while fresh, removed once silent."""
    monkeypatch.setattr(locks, "STALE_AFTER_S", 0.3)
    path = tmp_path / "fp.lock"
    path.write_text(json.dumps({"host": "another-node", "pid": 1, "nonce": "x", "time": 0}))
    lock = BuildLock(path)
    assert lock.break_if_stale() is None and path.exists()
    time.sleep(0.4)
    assert "no heartbeat" in lock.break_if_stale() and not path.exists()
