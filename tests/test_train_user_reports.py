"""Failures a user met running cap-train on a cluster, each written as the user met it: a worker that a
script started, the config copy in output_dir, an epoch<N>/ folder being replaced, a checkpoint given to
cap-export, an eval with no progress line, a full disk at start-up (also tests/test_train_faults.py)."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import tomllib
import torch
from safetensors.torch import load_file, save_file

from cap_common.errors import CapError
from tests.test_train import CAP_TRAIN, ENV, free_port, metrics, stop, write_config

CAP_EXPORT = [sys.executable, "-m", "cap_export.cli"]


def _ended(pid: int) -> bool:
    """The process is gone, or a zombie nobody reaped yet."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait(predicate, timeout: float) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


# ---------------------------------------------------------------- (a) who may kill a worker
@pytest.mark.slow
def test_a_worker_started_by_a_script_that_exits_trains_on(tmp_path, tiny_model_dir):
    """`python -m cap_train.worker CFG &` in a script that then exits: the worker is not killed with
    its parent (only the workers of cap-train's own launcher are); it trains to the end."""
    cfg = write_config(tmp_path, tiny_model_dir("llama"), use_control_adapters=True, max_steps=2, evals_per_run=0)
    logs = tmp_path / "out" / "logs" / "by-hand"
    env = {**ENV, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_SIZE": "1"}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), DS_ACCELERATOR="cpu")
    env.pop("CAP_LAUNCHER_PID", None)
    # the script exits once the worker has started its log (and set up its death signal, if it does)
    script = (
        f"{sys.executable} -m cap_train.worker {cfg} --log-dir {logs} >/dev/null 2>&1 &\n"
        f"while [ ! -e {logs}/rank0.log ]; do sleep 0.05; done\necho $!\n"
    )
    shell = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, timeout=120)
    worker = int(shell.stdout.split()[-1])
    try:
        assert _wait(lambda: _ended(worker), 120), "the worker did not finish"
        log = (logs / "rank0.log").read_text()
        assert (tmp_path / "out" / "summary.json").is_file(), log[-2000:]
        assert "cap-train: done — 2 steps" in log and "stopped" not in log
    finally:
        if not _ended(worker):
            os.kill(worker, signal.SIGKILL)


@pytest.mark.slow
def test_a_worker_whose_launcher_is_killed_stops_and_says_why_in_its_log(tmp_path, tiny_model_dir):
    """kill -9 of cap-train's launcher: its worker stops within seconds, the last line of its log
    saying that the launcher is gone."""
    from tests.test_train_faults import _metrics_step, _rank_pid

    cfg = write_config(tmp_path, tiny_model_dir("llama"), use_control_adapters=True, epochs=50, evals_per_run=0)
    out = tmp_path / "out"
    proc = subprocess.Popen(
        CAP_TRAIN + [str(cfg), "--master-port", str(free_port())],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env=ENV,
    )
    try:
        assert _wait(lambda: _metrics_step(out) >= 1 or proc.poll() is not None, 300) and proc.poll() is None
        worker = _rank_pid(proc.pid, 0)
        assert worker is not None
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert _wait(lambda: _ended(worker), 10), "the worker outlived its launcher"
    finally:
        stop(proc)
    (log,) = out.glob("logs/*/rank0.log")
    last = log.read_text().splitlines()[-1]
    assert last == (
        f"cap-train: stopped (rank 0 on {os.uname().nodename}): the cap-train launcher that started this "
        f"worker (pid {proc.pid}) is gone"
    )


# ---------------------------------------------------------------- (c) the config copy
def test_the_config_copy_loads_the_same_config_from_anywhere(tmp_path, tiny_model_dir, monkeypatch):
    """Relative paths (next to the config, and under the working directory) in the copy are the
    absolute paths the run used; the user's comments stay; a copy of the copy names the original."""
    from cap_common.config import COPY_HEADER, load_config, run_copy

    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (project / "data" / "a.jsonl").write_text('{"text": "x"}\n')
    (project / "model").symlink_to(tiny_model_dir("llama"))
    monkeypatch.chdir(project)
    (project / "conf").mkdir()
    (project / "conf" / "cfg.toml").write_text(
        "# my run\nmodel_dir = 'model'  # under the working directory\noutput_dir = \"out\"\nlr = 1e-3\n"
        "sequence_len = 32\nlora_rank = 4\n\n[[datasets]]\ndataset_path = 'data/*.jsonl' # glob\n"
    )
    cfg = load_config(project / "conf" / "cfg.toml")
    copy = cfg.output_dir / "config.toml"
    copy.parent.mkdir()
    copy.write_text(run_copy(cfg))
    text = copy.read_text()
    assert text.startswith(COPY_HEADER + "\n") and str(project / "conf" / "cfg.toml") in text.splitlines()[1]
    assert "# my run\n" in text and "# under the working directory" in text and "# glob" in text
    monkeypatch.chdir(tmp_path)
    again = load_config(copy)
    assert again.to_dict() == cfg.to_dict()
    assert again.output_dir == project / "conf" / "out" and again.model_dir == tiny_model_dir("llama").resolve()
    # the copy of a copy (a resumed run writes it again) is the same text
    assert run_copy(again) == text
    # a path that is not a one-line string on its own line: the config written anew, same values
    (project / "conf" / "inline.toml").write_text(
        "model_dir = '../model'\noutput_dir = 'out'\nlr = 1e-3\nsequence_len = 32\nlora_rank = 4\n"
        "datasets = [{dataset_path = '../data/a.jsonl'}]\n"
    )
    inline = load_config(project / "conf" / "inline.toml")
    copy.write_text(run_copy(inline))
    assert load_config(copy).to_dict() == inline.to_dict()
    assert tomllib.loads(copy.read_text())["datasets"][0]["dataset_path"] == str(project / "conf/../data/a.jsonl")


# ---------------------------------------------------------------- (d) epoch<N>/ replaced whole
def _adapter_version(folder: Path) -> tuple[int, int]:
    """(rank in adapter_config.json, rank of the weights) of an adapter folder."""
    rank = json.loads((folder / "adapter_config.json").read_text())["r"]
    weights = load_file(str(folder / "adapter_model.safetensors"))
    return rank, next(iter(weights.values())).shape[0]


def _write_version(tmp_path: Path, folder: Path, rank: int) -> None:
    from cap_train.outputs import write_epoch_output

    cfg = SimpleNamespace(
        mode="control",
        use_control_adapters=True,
        lora_rank=rank,
        alpha=1.0,
        lora_dropout=0.0,
        control_adapter_type="full",
        control_adapter_target="block",
        model_dir="/model",
    )
    parts = tmp_path / f"parts{rank}"
    parts.mkdir(exist_ok=True)
    key = "base_model.model.model.layers.0.control_{}.weight"
    weights = {key.format("A"): torch.ones(rank, 8), key.format("B"): torch.zeros(8, rank)}
    save_file(weights, parts / "stage0.safetensors")
    write_epoch_output(cfg, parts, folder)


def test_an_epoch_folder_is_replaced_whole(tmp_path, monkeypatch):
    """epoch1/ rewritten (rank 2 → rank 3): whichever rename fails, epoch1/ is the old pair or the new
    one, never weights of one with the config of the other; a swap cut short by a kill is put back
    by the next run's clean_outputs."""
    from cap_common.files import HOST
    from cap_train import outputs
    from cap_train.worker import clean_outputs

    out = tmp_path / "out"
    folder = out / "epoch1"
    _write_version(tmp_path, folder, 2)
    real_rename = os.rename
    for fail_at in (1, 2):  # 1: setting the old folder aside, 2: renaming the new one into place
        calls = []

        def rename(src, dst):
            calls.append(dst)
            if len(calls) == fail_at:
                raise OSError(errno.EIO, "injected", str(dst))
            real_rename(src, dst)

        monkeypatch.setattr(outputs.os, "rename", rename)
        with pytest.raises(OSError):
            _write_version(tmp_path, folder, 3)
        monkeypatch.setattr(outputs.os, "rename", real_rename)
        assert _adapter_version(folder) == (2, 2)
        assert sorted(p.name for p in out.iterdir()) == ["epoch1"]  # no temporary left
    _write_version(tmp_path, folder, 3)
    assert _adapter_version(folder) == (3, 3) and sorted(p.name for p in out.iterdir()) == ["epoch1"]
    # killed between the renames: the old folder aside, the new one unfinished or complete beside it
    dead = 2**22 + 7  # above the default pid_max: never a running process
    aside = out / f".epoch1.old.tmp-{HOST}-{dead}-0a0b0c0d"
    real_rename(folder, aside)
    (out / f".epoch1.tmp-{HOST}-{dead}-01020304").mkdir()
    clean_outputs(out)
    assert _adapter_version(folder) == (3, 3) and sorted(p.name for p in out.iterdir()) == ["epoch1"]


# ---------------------------------------------------------------- (f) eval progress
def test_eval_progress_is_throttled_and_ends_with_a_summary(monkeypatch, capsys):
    """A progress line at most every EVAL_PROGRESS_S seconds (sequences, rate, ETA), then one summary."""
    from cap_train import metrics

    now = [100.0]
    monkeypatch.setattr(metrics.time, "monotonic", lambda: now[0])
    progress = metrics.EvalProgress(True, 0, 47_625)
    for done in range(80, 47_625 + 1, 80):
        now[0] += 0.5  # 160 sequences/s
        progress.update(done)
    progress.finish({"eval/loss_all": 2.5, "eval/loss_class+1": 2.25, "eval/loss_class-1": 2.75})
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 59 + 1  # 297.5 s: a line every 5 s, then the summary
    assert lines[0] == "eval at step 0: 800/47,625 sequences  160.0 seq/s  ETA 0:04:52"
    assert lines[-1] == "eval at step 0: loss 2.5000 (class +1 2.2500, class -1 2.7500)  47,625 sequences in 0:04:57"
    metrics.EvalProgress(False, 0, 10).finish({"eval/loss_all": 1.0})  # other ranks: nothing
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------- (b) a full disk names the file
def test_a_full_disk_names_the_file_it_could_not_write(tmp_path, monkeypatch):
    """The start marker and the metrics files on a full disk: one CapError naming the path and the cause
    (tests/test_train_faults.py meets a really full disk end to end)."""
    from cap_train import metrics, startup

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    out = tmp_path / "out"
    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(CapError) as e:
        startup._write_marker(out / ".cap-start-1")
    assert str(e.value) == f"output_dir {out}: cannot write there ({out}/.cap-start-1: No space left on device)"
    monkeypatch.undo()
    m = metrics.Metrics(out, True, 10)
    m.jsonl = SimpleNamespace(write=lambda text: None, flush=full)
    with pytest.raises(CapError) as e:
        m.scalars(1, {"train/loss": 1.0})
    assert str(e.value) == f"{out}/metrics.jsonl: cannot write (No space left on device)"
    m.writer.file_writer.add_summary = full
    with pytest.raises(CapError) as e:
        m.scalars(1, {"train/loss": 1.0})
    assert str(e.value) == f"{out}/tensorboard: cannot write (No space left on device)"
    m.writer.close()


# ---------------------------------------------------------------- one short run, used by (c), (e), (f)
@pytest.fixture(scope="module")
def relative_run(tmp_path_factory, tiny_model_dir):
    """A 2-step control adapter run with evals, every path in its config relative (model_dir and
    output_dir next to the config), run from the config's folder: (folder, the cap-train process)."""
    folder = tmp_path_factory.mktemp("relative")
    (folder / "model").symlink_to(tiny_model_dir("llama"))
    write_config(folder, folder / "model", use_control_adapters=True, max_steps=2, model_dir="model", output_dir="out")
    return folder, train_in(folder, "cfg.toml")


def train_in(folder: Path, *args: str) -> subprocess.CompletedProcess:
    """cap-train ARGS run from `folder`, which must succeed."""
    run = subprocess.run(
        CAP_TRAIN + [*args, "--master-port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=600,
        env=ENV,
        cwd=folder,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return run


@pytest.mark.slow
def test_an_eval_shows_a_summary_line(relative_run):
    """Each eval (before the first step, and after steps 1 and 2) ends with a summary line on the console
    and in rank 0's log."""
    folder, run = relative_run
    summaries = [line for line in run.stderr.splitlines() if line.startswith("eval at step")]
    assert [line.split(":")[0] for line in summaries] == ["eval at step 0", "eval at step 1", "eval at step 2"]
    loss = metrics(folder / "out")[0]["eval/loss_all"]
    assert summaries[0].startswith(f"eval at step 0: loss {loss:.4f} (class +1 ")
    assert " sequences in 0:00:0" in summaries[0]
    logs = re.search(r"each rank's full output: (\S+)/rank<r>\.log", run.stderr).group(1)
    assert summaries[0] in (Path(logs) / "rank0.log").read_text()


@pytest.mark.slow
def test_resuming_from_the_config_copy_continues_the_run(relative_run):
    """`cap-train out/config.toml --resume-from-checkpoint` (max_steps raised in the copy) resumes the
    run at its checkpoint, in the same output_dir, with the same model and data."""
    folder, _ = relative_run
    copy = folder / "out" / "config.toml"
    copy.write_text(copy.read_text().replace("max_steps = 2\n", "max_steps = 3\n"))
    run = train_in(folder, "out/config.toml", "--resume-from-checkpoint")
    assert f"resumed from {folder / 'out' / 'checkpoints' / 'step00000002'} at step 2" in run.stderr
    assert "changed settings, in effect from the next step: max_steps 2 → 3" in run.stderr
    assert "accepted" not in run.stderr and not (folder / "out" / "out").exists()
    assert sorted(metrics(folder / "out")) == [0, 1, 2, 3]
    assert "max_steps = 3\n" in copy.read_text()


# ---------------------------------------------------------------- (e) cap-export takes a checkpoint
@pytest.mark.slow
def test_export_takes_a_checkpoint_as_the_epoch_folder(relative_run, tmp_path):
    """The run's last checkpoint and its epoch1/ hold the same weights: cap-export multiplicative gives
    equal tensors from either, and records the checkpoint as its source; inspect reads a checkpoint too."""
    folder, _ = relative_run
    out = folder / "out"
    newest = sorted(out.glob("checkpoints/step*"))[-1]
    sources = {"ckpt": newest, "epoch": out / "epoch1"}
    commands = [["multiplicative", str(source), str(tmp_path / name)] for name, source in sources.items()]
    runs = [  # side by side: each is mostly the start-up of one process
        subprocess.Popen(CAP_EXPORT + c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
        for c in commands + [["inspect", str(newest), "--json"]]
    ]
    outputs = [run.communicate(timeout=300) for run in runs]
    for run, (_, err) in zip(runs, outputs):
        assert run.returncode == 0, err
    exported = {name: load_file(str(tmp_path / name / "adapter_model.safetensors")) for name in sources}
    assert exported["ckpt"].keys() == exported["epoch"].keys()
    for key, value in exported["epoch"].items():
        assert torch.equal(exported["ckpt"][key], value), key
    for name, source in sources.items():
        assert json.loads((tmp_path / name / "cap_export.json").read_text())["source"] == str(source.resolve())
    assert json.loads(outputs[2][0])["adapter"] == str(newest.resolve())
    # the adapter cap-export assembles from the checkpoint: epoch1/'s two files, byte for byte
    from cap_train.outputs import write_checkpoint_adapter

    write_checkpoint_adapter(newest, tmp_path / "assembled")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "assembled" / name).read_bytes() == (out / "epoch1" / name).read_bytes(), name


def test_export_refuses_a_full_fine_tune_checkpoint_in_one_line(tmp_path):
    """A full fine-tune checkpoint holds no adapter: one line saying so, exit code 2."""
    from cap_train.checkpoint import file_record

    ckpt = tmp_path / "checkpoints" / "step00000004"
    ckpt.mkdir(parents=True)
    save_file({"1.layer.mlp.down_proj.weight": torch.zeros(2, 2)}, str(ckpt / "trainable-stage0.safetensors"))
    run_record = {"full_fine_tune": True, "model_dir": "/m", "output_dir": "/o", "lr": 1e-3, "sequence_len": 8}
    state = {"format": 3, "step": 4, "epoch": 0, "step_in_epoch": 4, "tokens": 64, "run": run_record}
    state["files"] = {"trainable-stage0.safetensors": file_record(ckpt / "trainable-stage0.safetensors")}
    (ckpt / "state.json").write_text(json.dumps(state))
    run = subprocess.run(CAP_EXPORT + ["inspect", str(ckpt)], capture_output=True, text=True, env=ENV)
    assert run.returncode == 2
    assert run.stderr.splitlines() == [
        f"cap-export: error: {ckpt}: a full fine-tune checkpoint; cap-export reads adapters (the run's "
        "epoch<N>/ folders hold the trained model as a Hugging Face model folder)"
    ]
