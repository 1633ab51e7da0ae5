"""One cap-train run per output_dir (cap_train/run_lock.py): a second run into the same folder is
refused in one line while the first goes on unharmed; a lock whose run is gone is taken over."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from cap_common.errors import CapError
from cap_common.files import HOST
from cap_train import run_lock
from tests.test_train import finish, metrics, run_train, start_train, write_config


def write_lock(folder, host: str, pid: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / run_lock.LOCK_NAME).write_text(json.dumps({"host": host, "pid": pid, "nonce": "x", "time": 0}))


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_live_run_on_this_host_is_refused_at_once(tmp_path):
    write_lock(tmp_path, HOST, os.getpid())
    said = []
    t0 = time.monotonic()
    with pytest.raises(CapError, match=rf"another cap-train run is writing here \(pid {os.getpid()} on {HOST}\)"):
        with run_lock.one_run(tmp_path, said.append):
            pass
    assert time.monotonic() - t0 < 1 and not said


def test_the_lock_of_a_dead_run_is_taken_over_and_released(tmp_path):
    write_lock(tmp_path / "out", HOST, dead_pid())
    said = []
    with run_lock.one_run(tmp_path / "out", said.append):
        held = json.loads((tmp_path / "out" / run_lock.LOCK_NAME).read_text())
        assert (held["host"], held["pid"]) == (HOST, os.getpid())
    assert len(said) == 1 and "took over the lock of a run that is gone" in said[0] and "is not running" in said[0]
    assert not (tmp_path / "out" / run_lock.LOCK_NAME).exists()


def test_another_hosts_lock_is_refused_once_its_heartbeat_shows(tmp_path):
    write_lock(tmp_path, "node7", 4242)
    stop = threading.Event()

    def heartbeat():
        while not stop.wait(0.3):
            os.utime(tmp_path / run_lock.LOCK_NAME)

    beat = threading.Thread(target=heartbeat)
    beat.start()
    said = []
    try:
        with pytest.raises(CapError, match="another cap-train run is writing here \\(pid 4242 on node7\\)"):
            with run_lock.one_run(tmp_path, said.append):
                pass
    finally:
        stop.set()
        beat.join()
    assert len(said) == 1 and "waiting up to" in said[0]


def test_another_hosts_lock_without_heartbeat_is_taken_over(tmp_path, monkeypatch):
    import cap_prep.lock

    monkeypatch.setattr(cap_prep.lock, "STALE_AFTER_S", 1.0)
    write_lock(tmp_path, "node7", 4242)
    said = []
    with run_lock.one_run(tmp_path, said.append):
        pass
    assert "no heartbeat" in said[-1] and not (tmp_path / run_lock.LOCK_NAME).exists()


@pytest.mark.slow
def test_a_second_run_into_the_same_output_dir_is_refused_while_the_first_goes_on(tmp_path, tiny_model_dir):
    cfg = write_config(tmp_path, tiny_model_dir("llama"), max_steps=4, evals_per_run=2)
    out = tmp_path / "out"
    first = start_train(cfg)
    try:
        deadline = time.monotonic() + 120
        while not (out / run_lock.LOCK_NAME).exists():
            assert first.poll() is None and time.monotonic() < deadline, first.err_path.read_text()[-2000:]
            time.sleep(0.05)
        second = run_train(cfg, 1, check=False)
        assert first.poll() is None  # the first still runs: the refusal was not a race won by luck
    finally:
        finish(first)
    errors = [line for line in second.stderr.splitlines() if "error" in line]
    assert second.returncode == 2 and len(errors) == 1, second.stderr[-2000:]
    assert f"{out}: another cap-train run is writing here (pid " in errors[0]
    assert len(list((out / "logs").iterdir())) == 1  # the second run wrote nothing
    assert sorted(metrics(out)) == [0, 1, 2, 3, 4]
    rows = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows == sorted(rows)  # one run's rows, in order
    assert not (out / run_lock.LOCK_NAME).exists()
