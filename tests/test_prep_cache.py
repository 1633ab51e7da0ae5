"""cap-prep's cache: fingerprint, reuse, one writer under a lock, crash safety."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cap_prep import build, cache, dataset_folder, load_manifest, prepare
from cap_prep import lock as locks
from tests.test_prep import documents, make, write_all_formats, write_config  # noqa: F401 (fixture)

REPO = Path(__file__).resolve().parents[1]


def test_second_run_reuses_quickly(make, capsys):
    cfg = make([(documents(20, seed=1), {})])
    folder = prepare(cfg)
    assert "building" in capsys.readouterr().out
    manifest_mtime = (folder / "manifest.json").stat().st_mtime_ns
    t0 = time.perf_counter()
    again = prepare(cfg)
    elapsed = time.perf_counter() - t0
    assert again == folder == dataset_folder(cfg)
    assert elapsed < 0.5 and "reusing" in capsys.readouterr().out
    assert (folder / "manifest.json").stat().st_mtime_ns == manifest_mtime


def test_fingerprint_follows_content_tokenizer_and_prep_keys(make, tmp_path, tiny_model_dir):
    cfg = make([(documents(10, seed=2), {})])
    base = dataset_folder(cfg)
    assert dataset_folder(make([(documents(10, seed=2), {})], lr=3e-3, epochs=4)) == base  # not a prep key
    data = tmp_path / "data0" / "1.jsonl"
    os.utime(data, ns=(1, 1))  # same content, new mtime: same folder
    assert dataset_folder(cfg) == base
    data.write_text(data.read_text().replace("a", "e", 1))  # same size, new content
    changed = dataset_folder(cfg)
    assert changed != base
    assert dataset_folder(make([(documents(10, seed=2), {})], sequence_len=32)) not in (base, changed)
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir("llama"), model)
    assert dataset_folder(make([(documents(10, seed=2), {})], model_dir=str(model))) == dataset_folder(
        make([(documents(10, seed=2), {})])
    )
    tc = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**tc, "model_max_length": 77}))
    assert dataset_folder(make([(documents(10, seed=2), {})], model_dir=str(model))) != dataset_folder(
        make([(documents(10, seed=2), {})])
    )


def test_concurrent_builders_build_once(make, capsys):
    cfg = make([(documents(200, seed=3), {})])
    results = []
    threads = [threading.Thread(target=lambda: results.append(prepare(cfg))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out = capsys.readouterr().out
    assert len(set(results)) == 1 and len(results) == 2
    assert out.count("cap-prep: building") == 1
    assert sorted(p.name for p in results[0].parent.iterdir()) == [".file-hashes.json", results[0].name]


def test_folder_published_while_loading_the_tokenizer_is_reused(make, monkeypatch, capsys):
    """Another node finishes between our first look and our lock: we must not build again."""
    cfg = make([(documents(10, seed=10), {})])
    load = build.load_tokenizer
    calls = []

    def load_while_another_builds(*args):
        calls.append(1)
        if len(calls) == 1:
            prepare(cfg)  # "the other node"
        return load(*args)

    monkeypatch.setattr(build, "load_tokenizer", load_while_another_builds)
    assert prepare(cfg) == dataset_folder(cfg)
    out = capsys.readouterr().out
    assert out.count("cap-prep: building") == 1 and "was built by another process" in out


def _lock_file(cfg, host, pid):
    folder = dataset_folder(cfg)
    folder.parent.mkdir(parents=True, exist_ok=True)
    lock = folder.parent / f"{folder.name}.lock"
    lock.write_text(json.dumps({"host": host, "pid": pid, "nonce": "x", "time": 0}))
    return folder, lock


def test_waiter_waits_for_the_lock_holder(make, capsys):
    cfg = make([(documents(10, seed=4), {})])
    folder, lock = _lock_file(cfg, socket.gethostname(), os.getpid())  # held by a live process
    result = []
    waiter = threading.Thread(target=lambda: result.append(prepare(cfg)))
    waiter.start()
    time.sleep(1.5)
    assert waiter.is_alive() and not folder.exists()
    lock.unlink()  # the holder gave up without building
    waiter.join(timeout=30)
    assert result == [folder] and cache.is_complete(folder)
    assert "waiting for pid" in capsys.readouterr().out


def test_stale_locks_are_broken(make, monkeypatch, capsys):
    cfg = make([(documents(10, seed=5), {})])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    folder, lock = _lock_file(cfg, socket.gethostname(), dead.pid)  # a dead process on this host
    assert prepare(cfg) == folder and not lock.exists()
    monkeypatch.setattr(locks, "STALE_AFTER_S", 0.5)
    monkeypatch.setattr(locks, "POLL_S", 0.05)
    cfg = make([(documents(10, seed=5), {})], seed=1)
    folder, lock = _lock_file(cfg, "some-other-node", 1)  # another host, silent
    assert prepare(cfg) == folder and not lock.exists()
    assert capsys.readouterr().out.count("removed the stale lock") == 2


def test_killed_build_is_never_taken_for_complete(make):
    cfg = make([(documents(30, seed=6), {})])
    pid = os.fork()
    if pid == 0:  # the builder, killed just before its rename
        try:
            os.environ["TOKENIZERS_PARALLELISM"] = "false"  # rayon's pool does not survive fork
            locks.publish = lambda *a: os.kill(os.getpid(), signal.SIGKILL)
            prepare(cfg, quiet=True)
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    folder = dataset_folder(cfg)
    root = folder.parent
    leftovers = sorted(p.name for p in root.iterdir())
    assert not folder.exists() and not cache.is_complete(folder)
    assert f"{folder.name}.lock" in leftovers and any(n.startswith(f".tmp-{folder.name}") for n in leftovers)
    assert prepare(cfg, quiet=True) == folder and cache.is_complete(folder)
    assert sorted(p.name for p in root.iterdir()) == [".file-hashes.json", folder.name]  # no lock, no temp
    assert load_manifest(folder)["splits"]["train"]["sequences"] > 0


def test_force_rebuilds_in_place(make):
    cfg = make([(documents(10, seed=7), {})])
    folder = prepare(cfg, quiet=True)
    created = load_manifest(folder)["created"]
    (folder / "marker").write_text("old build")
    assert prepare(cfg, quiet=True, force=True) == folder
    assert not (folder / "marker").exists() and load_manifest(folder)["created"] >= created
    assert sorted(p.name for p in folder.parent.iterdir()) == [".file-hashes.json", folder.name]


def test_truncated_shard_is_rebuilt(make, capsys):
    """A shard cut short (e.g. a power loss before the data reached disk) makes the folder incomplete."""
    cfg = make([(documents(20, seed=9), {})])
    folder = prepare(cfg)
    shard = folder / "train-00000.arrow"
    good = shard.read_bytes()
    shard.write_bytes(good[:100])
    assert not cache.is_complete(folder)
    assert prepare(cfg) == folder and shard.read_bytes() == good
    assert capsys.readouterr().out.count("cap-prep: building") == 2


@pytest.mark.slow
def test_two_processes_build_once(tmp_path, tiny_model_dir):
    """Two cap-prep processes started together (as two nodes would): one builds, one reuses."""
    write_all_formats(tmp_path / "data", documents(300, seed=8))
    config = write_config(tmp_path, tiny_model_dir("llama"), [{"dataset_path": "data/*"}])
    cmd = [sys.executable, "-m", "cap_prep.cli", str(config)]
    procs = [
        subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert len({o.strip().splitlines()[-1] for o in outs}) == 1
    assert sum("cap-prep: building" in o for o in outs) == 1
