"""cap-train's failures as users meet them: a worker killed by a signal, a rank that fails alone,
a disk that fills up mid-run, and what a failed run leaves behind."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import tomllib
import transformers

from cap_train.checkpoint import damage, read_state
from tests import assets
from tests.test_train import CAP_TRAIN, ENV, free_port, stop, write_config

pytestmark = pytest.mark.slow


def _rank_pid(parent: int, rank: int) -> int | None:
    for child in psutil.Process(parent).children(recursive=True):
        try:
            if "cap_train.worker" in " ".join(child.cmdline()) and child.environ().get("RANK") == str(rank):
                return child.pid
        except psutil.Error:
            continue
    return None


def _metrics_step(out: Path) -> int:
    try:
        return max(json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines())
    except (OSError, ValueError):
        return -1


def test_a_killed_worker_is_named_in_one_line(tmp_path, tiny_model_dir):
    """kill -9 of rank 1 mid-run: one line naming rank, host and signal; rank 0's collateral
    'Connection reset by peer' stays in its log, whose folder is named."""
    cfg = write_config(
        tmp_path, tiny_model_dir("llama"), use_control_adapters=True, pipeline_stages=2, epochs=50, evals_per_run=0
    )
    proc = subprocess.Popen(
        CAP_TRAIN + [str(cfg), "--num-gpus", "2", "--master-port", str(free_port())],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env=ENV,
    )
    try:
        deadline = time.time() + 300
        while _metrics_step(tmp_path / "out") < 3 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        victim = _rank_pid(proc.pid, 1)
        assert victim is not None, "rank 1 not found"
        os.kill(victim, signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
    finally:
        stop(proc)
    assert proc.returncode == 128 + signal.SIGKILL
    lines = [line for line in err.splitlines() if line.startswith("cap-train: rank")]
    assert len(lines) == 1, err
    assert re.search(rf"rank 1 \(pid {victim}\) on {re.escape(os.uname().nodename)} was killed by SIGKILL", lines[0])
    assert "Traceback" not in err and "Connection reset" not in err and "rank 0" not in err
    logs = Path(re.search(r"full output of every rank: (\S+)", lines[0]).group(1))
    assert sorted(p.name for p in logs.iterdir()) == ["rank0.log", "rank1.log"]
    assert "step 3/" in (logs / "rank0.log").read_text()


def test_a_rank_that_fails_alone_is_the_one_reported(tmp_path):
    """The LM head's shard is unreadable: only rank 1 (stage 1) reads it. Its one line is shown;
    rank 0 only lost its peer and says nothing on the console."""
    model = tmp_path / "model"
    tokenizer = assets.tiny_tokenizer(model)
    transformers.AutoModelForCausalLM.from_config(assets.tiny_config("llama", tokenizer)).save_pretrained(
        model, max_shard_size="100KB"
    )
    index = json.loads((model / "model.safetensors.index.json").read_text())["weight_map"]
    head_shard = model / index["lm_head.weight"]
    assert index["model.embed_tokens.weight"] != index["lm_head.weight"]
    head_shard.write_bytes(head_shard.read_bytes()[:1000])
    cfg = write_config(tmp_path, model, use_control_adapters=True, pipeline_stages=2, max_steps=2)
    out = subprocess.run(
        CAP_TRAIN + [str(cfg), "--num-gpus", "2", "--master-port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
    )
    assert out.returncode == 2, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("cap-train: error (rank 1 on ") and head_shard.name in errors[0]
    assert "Traceback" not in out.stderr and "rank 0" not in out.stderr


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (root only; skipped where mounting is not allowed)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_full_disk_stops_the_run_in_one_line(tmp_path, tiny_model_dir, small_disk):
    """output_dir on a disk with ~200 KB free, a checkpoint after every step: the write that finds
    the disk full stops the run with one line naming where and why; no half-written checkpoint
    is left, and the checkpoints that were published all verify."""
    out = small_disk / "out"
    (small_disk / "filler").write_bytes(b"\0" * (1024 - 200) * 1024)
    cfg = write_config(
        tmp_path,
        tiny_model_dir("llama"),
        use_control_adapters=True,
        epochs=20,
        evals_per_run=0,
        checkpoint_interval_hours=1e-9,  # ~4 µs: a checkpoint after every step
        output_dir=str(out),
        prepared_dir=str(tmp_path / "prepared"),
    )
    run = subprocess.run(
        CAP_TRAIN + [str(cfg), "--master-port", str(free_port())], capture_output=True, text=True, timeout=300, env=ENV
    )
    assert run.returncode == 2, run.stderr[-3000:]
    errors = [line for line in run.stderr.splitlines() if line.startswith("cap-train: error")]
    assert len(errors) == 1 and str(out) in errors[0] and "No space left on device" in errors[0], run.stderr
    assert "Traceback" not in run.stderr
    ckpts = out / "checkpoints"
    assert not [p for p in ckpts.iterdir() if p.name.startswith(".tmp")] if ckpts.exists() else True
    for step in ckpts.glob("step*") if ckpts.exists() else ():
        assert damage(step, read_state(step)) is None
    shutil.rmtree(out, ignore_errors=True)


def test_a_disk_full_at_start_up_is_named_in_one_line(tmp_path, tiny_model_dir, small_disk):
    """output_dir on a disk that is full, or that fills up at one of the first writes (run lock, start
    marker, config copy, TensorBoard, metrics.jsonl: 0 to 16 KiB free), runs side by side: each stops with
    one line naming the path it could not write and saying that the disk is full; no traceback, and the
    config copy is whole or absent."""
    free_kib = (0, 4, 12, 16)
    disks, runs = [small_disk], []
    try:
        for i in range(1, len(free_kib)):  # a disk each: how full it is is the point
            disks.append(tmp_path / f"disk{i}")
            disks[-1].mkdir()
            mount = ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disks[-1])]
            assert subprocess.run(mount, capture_output=True).returncode == 0
        for disk, free in zip(disks, free_kib):
            fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)
            try:
                while True:
                    os.write(fd, b"\0" * 4096)
            except OSError:
                os.ftruncate(fd, os.fstat(fd).st_size - free * 1024)
            finally:
                os.close(fd)
            folder = tmp_path / f"free{free}"
            cfg = write_config(
                folder,
                tiny_model_dir("llama"),
                use_control_adapters=True,
                max_steps=2,
                output_dir=str(disk / "out"),
                prepared_dir=str(folder / "prepared"),
            )
            runs.append(
                subprocess.Popen(
                    CAP_TRAIN + [str(cfg), "--master-port", str(free_port())],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    text=True,
                    start_new_session=True,
                    env=ENV,
                )
            )
        for disk, free, run in zip(disks, free_kib, runs):
            _, err = run.communicate(timeout=300)
            assert run.returncode == 2, f"{free} KiB free: {err[-3000:]}"
            errors = [line for line in err.splitlines() if line.startswith("cap-train: error")]
            assert len(errors) == 1, f"{free} KiB free: {err}"
            assert f"{disk}/out" in errors[0] and "No space left on device" in errors[0], f"{free} KiB free: {err}"
            assert "Traceback" not in err and "Exception" not in err, f"{free} KiB free: {err}"
            copy = disk / "out" / "config.toml"
            assert not copy.exists() or tomllib.loads(copy.read_text())["max_steps"] == 2
    finally:
        for run in runs:
            stop(run)
        for disk in disks[1:]:
            subprocess.run(["umount", "-l", str(disk)], capture_output=True)
