"""Multi-GPU and multi-node start-up: which GPUs the ranks get (CUDA_VISIBLE_DEVICES with indices,
UUIDs and MIG instances; DeepSpeed's --include/--exclude forms), the hostfile launch command and the
environment it forwards, the worker's backend/device pair, and start-up checks that stop every rank
at once when one rank cannot see what it needs (two worker processes standing in for two nodes)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cap_common.errors import CapError
from cap_common.files import HOST
from cap_train.cli import deepspeed_command
from cap_train.cli import main as train_main
from cap_train.devices import backend_and_device, choose_gpus, visible_gpus
from cap_train.launch import forward_environment
from tests.test_train import CAP_TRAIN, ENV, free_port, stop, write_config

UUIDS = ["GPU-5c1e9a3d-0000-0000-0000-000000000001", "GPU-5c1e9a3d-0000-0000-0000-000000000002"]


# ---------------------------------------------------------------- which GPUs
@pytest.mark.parametrize(
    "env, count, want",
    [
        ({}, 4, ["0", "1", "2", "3"]),
        ({"CUDA_VISIBLE_DEVICES": "2,3"}, 2, ["2", "3"]),
        ({"CUDA_VISIBLE_DEVICES": ",".join(UUIDS)}, 2, UUIDS),
        ({"CUDA_VISIBLE_DEVICES": "MIG-aaaa,MIG-bbbb"}, 1, ["MIG-aaaa"]),  # CUDA shows one MIG instance
        ({"CUDA_VISIBLE_DEVICES": ""}, 0, []),
        ({"DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": "0"}, 1, []),  # the accelerator chosen wins
    ],
)
def test_visible_gpus_are_the_ones_cuda_visible_devices_leaves(env, count, want):
    assert visible_gpus(env, count) == want


def test_choose_gpus_honours_visibility_include_exclude_and_num():
    assert choose_gpus(["2", "3"], None, None, None) == ["2", "3"]
    assert choose_gpus(["2", "3"], None, None, 1) == ["2"]
    assert choose_gpus(["0", "1", "2", "3"], "localhost:3,1", None, None) == ["3", "1"]
    assert choose_gpus(["0", "1", "2", "3"], "1,2", None, None) == ["1", "2"]
    assert choose_gpus(["0", "1", "2", "3"], None, "localhost:0", 2) == ["1", "2"]
    assert choose_gpus(UUIDS, f"localhost:{UUIDS[1]}", None, None) == [UUIDS[1]]
    assert choose_gpus([], None, None, 2) == []  # CPU: --num-gpus counts gloo processes
    assert choose_gpus(["MIG-aaaa"], None, None, None) == ["MIG-aaaa"]


@pytest.mark.parametrize(
    "visible, include, exclude, num, says",
    [
        (["2", "3"], "localhost:0", None, None, "GPU 0 is not among the GPUs this process sees: 2, 3"),
        (["0", "1"], None, None, 3, "--num-gpus 3: only 2 GPU(s)"),
        (["0", "1"], "otherhost:0", None, None, "without --hostfile"),
        (["0", "1"], "0", "1", None, "give one of them"),
        (["0", "1"], None, "0,1", None, "leaves no GPU"),
        (["0", "1"], None, "5", None, "GPU 5 is not among"),
        ([], "0", None, None, "no GPU that CUDA can use"),
        (["MIG-a", "MIG-b"], None, None, None, "one MIG instance"),
    ],
)
def test_choose_gpus_refuses_in_one_line(visible, include, exclude, num, says):
    with pytest.raises(CapError) as e:
        choose_gpus(visible, include, exclude, num, "2,3")
    assert says in str(e.value) and "\n" not in str(e.value)


def test_hostfile_launch_command_and_num_gpus_refused(tmp_path, tiny_model_dir):
    cmd = deepspeed_command(["cfg.toml"], "hosts", "node1", 29600, include="node1:0,1@node2")
    assert cmd[cmd.index("--include") + 1] == "node1:0,1@node2"
    assert cmd[cmd.index("--hostfile") + 1] == "hosts" and cmd[cmd.index("--master_addr") + 1] == "node1"
    assert cmd[-3:] == ["--module", "cap_train.worker", "cfg.toml"]
    hostfile = tmp_path / "hosts"
    hostfile.write_text("node1 slots=8\nnode2 slots=8\n")
    cfg = write_config(tmp_path, tiny_model_dir("llama"))
    result = CliRunner().invoke(train_main, [str(cfg), "--hostfile", str(hostfile), "--num-gpus", "2"])
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0 and "--num-gpus does not apply with --hostfile" in result.output


@pytest.mark.parametrize(
    "visible, args, want",
    [
        ("2,3", ["--num-gpus", "2"], "2,3"),
        ("2,3", [], "2,3"),
        ("2,3", ["--include", "localhost:3"], "3"),
        (",".join(UUIDS), ["--exclude", f"localhost:{UUIDS[0]}"], UUIDS[1]),
        (None, ["--num-gpus", "1"], "0"),
    ],
)
def test_the_launch_gives_the_ranks_the_chosen_gpus(tmp_path, tiny_model_dir, monkeypatch, visible, args, want):
    """What cap-train hands its launcher on a 4-GPU node (CUDA mocked): CUDA_VISIBLE_DEVICES = the
    chosen GPUs (rank r uses entry r), one process each, NCCL's path (no CPU accelerator forced)."""
    from cap_train import devices, launch

    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    monkeypatch.setattr(devices, "cuda_device_count", lambda: len(visible.split(",")) if visible else 4)
    calls = []
    monkeypatch.setattr(launch, "run_local", lambda cmd, procs, port, env, *_: calls.append((procs, env)) or 0)
    cfg = write_config(tmp_path, tiny_model_dir("llama"))
    result = CliRunner().invoke(train_main, [str(cfg), *args])
    assert result.exit_code == 0, result.output
    ((procs, env),) = calls
    assert env["CUDA_VISIBLE_DEVICES"] == want and procs == len(want.split(","))
    assert "DS_ACCELERATOR" not in env


def test_the_hostfile_launch_forwards_include_and_environment(tmp_path, tiny_model_dir, monkeypatch):
    import cap_train.cli
    import cap_train.launch

    hostfile = tmp_path / "hosts"
    hostfile.write_text("node1 slots=2\nnode2 slots=2\n")
    monkeypatch.setenv("HF_HOME", "/shared/hf")
    calls = []
    monkeypatch.setattr(cap_train.cli, "check_launch", lambda launcher, hostfile: calls.append(launcher))
    monkeypatch.setattr(cap_train.launch, "run_hostfile", lambda cmd, env, *_: calls.append((cmd, env)) or 0)
    cfg = write_config(tmp_path, tiny_model_dir("llama"))
    result = CliRunner().invoke(train_main, [str(cfg), "--hostfile", str(hostfile), "--include", "node1@node2:0"])
    assert result.exit_code == 0, result.output
    launcher, (cmd, env) = calls
    assert launcher == "pdsh" and cmd[cmd.index("--launcher") + 1] == "pdsh"
    assert cmd[cmd.index("--include") + 1] == "node1@node2:0" and "--num_gpus" not in cmd
    assert "HF_HOME=/shared/hf" in Path(env["DS_ENV_FILE"]).read_text().splitlines()


def test_multinode_environment_file(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / ".deepspeed_env").write_text("HF_HOME=/from/user/file\nNCCL_IB_DISABLE=1\n")
    monkeypatch.chdir(tmp_path)
    env = {
        "CAP_CACHE_DIR": "/shared/cache",
        "HF_HOME": "/shared/hf",
        "HF_HUB_OFFLINE": "1",
        "TRITON_CACHE_DIR": "/tmp/triton",
        "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
        "OMP_NUM_THREADS": "8",
        "CUDA_VISIBLE_DEVICES": "0,1",  # DeepSpeed sets it on each node from the hostfile
        "HOME": "/home/me",
        "PATH": "/usr/bin",
        "TOKENIZERS_PARALLELISM": 'say "hi"',  # cannot travel through DeepSpeed's quoting
    }
    skipped = forward_environment(env, tmp_path / "logs" / "deepspeed_env")
    assert skipped == ["TOKENIZERS_PARALLELISM"]
    assert env["DS_ENV_FILE"] == str(tmp_path / "logs" / "deepspeed_env")
    lines = (tmp_path / "logs" / "deepspeed_env").read_text().splitlines()
    assert lines == [
        "CAP_CACHE_DIR=/shared/cache",
        "HF_HOME=/shared/hf",
        "HF_HUB_OFFLINE=1",
        "OMP_NUM_THREADS=8",
        "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True",
        "TRITON_CACHE_DIR=/tmp/triton",
        "HF_HOME=/from/user/file",  # the user's own file is read last: it wins
        "NCCL_IB_DISABLE=1",
    ]
    # what DeepSpeed's runner does with the file: KEY=VALUE per line, later lines override
    from deepspeed.launcher import multinode_runner

    runner = multinode_runner.PDSHRunner.__new__(multinode_runner.PDSHRunner)
    runner.exports = {}
    for line in lines:
        runner.add_export(*line.split("=", 1))
    assert runner.exports["HF_HOME"] == "/from/user/file" and runner.exports["CAP_CACHE_DIR"] == "/shared/cache"


# ---------------------------------------------------------------- backend and device
def test_backend_and_device_follow_the_accelerator_not_torch_cuda(monkeypatch):
    """A GPU host whose tests force DeepSpeed's CPU accelerator: gloo + CPU, never NCCL + CPU tensors."""
    from deepspeed.accelerator import real_accelerator

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(real_accelerator, "ds_accelerator", None)  # chosen afresh under the mock
    assert backend_and_device(1) == ("gloo", torch.device("cpu"))

    class Cuda:  # what DeepSpeed's CUDA accelerator answers
        def device_name(self, index=None):
            return "cuda"

        def communication_backend_name(self):
            return "nccl"

    monkeypatch.setattr(real_accelerator, "ds_accelerator", Cuda())
    assert backend_and_device(1) == ("nccl", torch.device("cuda", 1))


# ---------------------------------------------------------------- start-up checks across "nodes"
def start_worker(cfg, rank: int, port: int, log_dir) -> subprocess.Popen:
    """One rank of a 2-node run (LOCAL_RANK 0 on each), started as DeepSpeed's launcher would."""
    env = {
        **ENV,
        "DS_ACCELERATOR": "cpu",
        "RANK": str(rank),
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "2",
        "LOCAL_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }
    return subprocess.Popen(
        [sys.executable, "-u", "-m", "cap_train.worker", str(cfg), "--log-dir", str(log_dir)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def run_two_nodes(cfg0, cfg1, tmp_path) -> tuple[list[subprocess.Popen], list[tuple[str, str]]]:
    """Ranks 0 and 1 on their configs, each waited for up to a minute: (processes, (stdout, stderr) each)."""
    port = free_port()
    procs = [start_worker(cfg0, 0, port, tmp_path / "logs0"), start_worker(cfg1, 1, port, tmp_path / "logs1")]
    return procs, outputs(procs, timeout=60)


def outputs(procs: list[subprocess.Popen], timeout: float) -> list[tuple[str, str]]:
    """(stdout, stderr) of each process, each waited for up to `timeout` s; any still running is killed."""
    try:
        return [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            stop(p)


@pytest.mark.slow
@pytest.mark.parametrize("problem", ["output_dir", "model_dir"])
def test_one_rank_failing_a_start_up_check_stops_every_rank(tmp_path, tiny_model_dir, problem):
    """Node 2 has another output folder (storage not shared) or no model: both ranks stop within a
    minute; the failing rank says why in one line; the other stops quietly (exit 3)."""
    model = tiny_model_dir("llama")
    node1 = write_config(tmp_path / "node1", model, max_steps=2)
    if problem == "output_dir":
        node2 = write_config(tmp_path / "node2", model, max_steps=2, output_dir=str(tmp_path / "node2" / "local-out"))
        says = "does not hold the marker file rank 0 wrote"
    else:
        node2 = write_config(
            tmp_path / "node2", tmp_path / "no-model", max_steps=2, output_dir=str(tmp_path / "node1" / "out")
        )
        says = "no-model': folder not found"  # the config check of rank 1's node
    t0 = time.monotonic()
    procs, outs = run_two_nodes(node1, node2, tmp_path)
    elapsed = time.monotonic() - t0
    assert elapsed < 60
    assert [p.returncode for p in procs] == [3, 2], outs
    line = outs[1][1].strip()
    assert line.count("\n") == 0, line
    assert line.startswith("cap-train: error (rank 1 on ") and says in line and "every rank stopped" in line
    assert "Traceback" not in outs[0][1] + outs[1][1] and outs[0][1].strip() == ""
    assert not list((tmp_path / "node1" / "out").glob(".cap-start-*"))  # markers removed


@pytest.mark.slow
def test_a_failed_data_preparation_stops_the_waiting_ranks(tmp_path, tiny_model_dir):
    """Rank 0 cannot prepare the data (a dataset file is not JSON): rank 1, waiting for it, stops at
    once instead of waiting out the preparation timeout."""
    node1 = write_config(tmp_path / "node1", tiny_model_dir("llama"), max_steps=2)
    (tmp_path / "node1" / "data" / "neg.jsonl").write_text("{not json\n")
    procs, outs = run_two_nodes(node1, node1, tmp_path)
    assert [p.returncode for p in procs] == [2, 3], outs
    assert "neg.jsonl" in outs[0][1] and outs[1][1].strip() == ""
    assert "rank 0 could not prepare the data" in (tmp_path / "logs1" / "rank1.log").read_text()


def test_collective_timeouts_come_from_the_environment(monkeypatch):
    from cap_train import startup

    assert startup.collective_timeout().total_seconds() == 5 * 60
    assert startup.prepare_timeout().total_seconds() == 4 * 3600
    monkeypatch.setenv("CAP_COLLECTIVE_TIMEOUT_MIN", "5")
    assert startup.collective_timeout().total_seconds() == 300
    monkeypatch.setenv("CAP_COLLECTIVE_TIMEOUT_MIN", "soon")
    with pytest.raises(CapError, match="CAP_COLLECTIVE_TIMEOUT_MIN='soon': expected a number of minutes"):
        startup.collective_timeout()


@pytest.mark.slow
def test_a_config_that_differs_on_one_rank_stops_every_rank_before_any_step(tmp_path, tiny_model_dir):
    """Node 2 reads its own copy of the config, with another lr and max_steps: both ranks stop at
    start-up, rank 0 with one line naming rank 1, its config and the keys that differ; nothing trains."""
    node1 = write_config(tmp_path / "node1", tiny_model_dir("llama"), max_steps=2, lr=0.002)
    node2 = node1.with_name("node2.toml")
    node2.write_text(node1.read_text().replace("lr = 0.002", "lr = 0.5").replace("max_steps = 2", "max_steps = 3"))
    procs, outs = run_two_nodes(node1, node2, tmp_path)
    assert [p.returncode for p in procs] == [2, 3], outs
    line = outs[0][1].strip()
    assert line.count("\n") == 0 and line.startswith("cap-train: error (rank 0 on "), line
    assert f"rank 1 on {HOST} ({node2}): lr = 0.5 (rank 0: 0.002), max_steps = 3 (rank 0: 2)" in line
    assert line.endswith("every rank stopped") and outs[1][1].strip() == ""
    assert not (tmp_path / "node1" / "out" / "metrics.jsonl").exists()


# ---------------------------------------------------------------- torchrun and srun (cap_train/external.py)
def test_the_launchers_variables_give_each_rank_its_place():
    from cap_train.external import first_node, launcher_environment, run_id

    torchrun = {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "29500"}
    assert launcher_environment(torchrun) == torchrun
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "123456"}
    slurm["SLURM_JOB_NODELIST"] = "gpu[07-09,12],cpu1"
    assert launcher_environment(slurm) == {
        "RANK": "5",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "gpu07",
        "MASTER_PORT": str(20000 + 123456 % 20000),
    }
    assert run_id(slurm) == "slurm-123456.0" and first_node("node1,node2") == "node1"
    assert launcher_environment({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) is None  # cap-train launches itself
    with pytest.raises(CapError, match="not MASTER_ADDR, MASTER_PORT"):
        launcher_environment({"RANK": "0", "WORLD_SIZE": "2"})


def start_rank(cfg, variables: dict, *extra) -> subprocess.Popen:
    """cap-train itself, started as one rank by torchrun or srun would start it."""
    return subprocess.Popen(
        [sys.executable, "-m", "cap_train.cli", str(cfg), *extra],
        env={**ENV, "DS_ACCELERATOR": "cpu", **variables},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def run_ranks(cfg, launcher: str) -> tuple[list[subprocess.Popen], list[tuple[str, str]]]:
    port = free_port()
    if launcher == "torchrun":
        common = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "TORCHELASTIC_RUN_ID": "t"}
        ranks = [{**common, "RANK": str(r), "LOCAL_RANK": str(r)} for r in (0, 1)]
    else:  # Slurm's variables only
        common = {"SLURM_NTASKS": "2", "SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "127.0.0.1"}
        common["MASTER_PORT"] = str(port)
        ranks = [{**common, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)} for r in (0, 1)]
    procs = [start_rank(cfg, variables) for variables in ranks]
    return procs, outputs(procs, timeout=300)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_model_dir):
    """metrics of a 1-process run of 3 steps."""
    from tests.test_train import metrics, run_train

    folder = tmp_path_factory.mktemp("one-process")
    run_train(write_config(folder, tiny_model_dir("llama"), max_steps=3), 1)
    return metrics(folder / "out")


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "slurm"])
def test_ranks_started_by_torchrun_or_srun_train_like_one_process(tmp_path, tiny_model_dir, one_process, launcher):
    """Two ranks (2 pipeline stages) started with torchrun's or Slurm's variables train the losses of
    one process; started again without --resume-from-checkpoint, rank 0 refuses to write over their
    checkpoints in one line, as cap-train's own launcher does, and rank 1 stops quietly."""
    from tests.test_train import metrics

    two = write_config(tmp_path / "two", tiny_model_dir("llama"), max_steps=3, pipeline_stages=2)
    procs, outs = run_ranks(two, launcher)
    assert [p.returncode for p in procs] == [0, 0], outs
    want, got = one_process, metrics(tmp_path / "two" / "out")
    for step in (1, 2, 3):
        assert got[step]["train/loss"] == pytest.approx(want[step]["train/loss"], rel=1e-4)
    logs = tmp_path / "two" / "out" / "logs"
    assert [p.name for p in logs.iterdir()] == ["torchrun-t" if launcher == "torchrun" else "slurm-77.0"]
    assert sorted(p.name for p in next(logs.iterdir()).iterdir()) == ["rank0.log", "rank1.log"]
    procs, outs = run_ranks(two, launcher)
    assert [p.returncode for p in procs] == [2, 3], outs
    assert "holds checkpoints of an earlier run" in outs[0][1] and outs[1][1].strip() == ""
    assert not (tmp_path / "two" / "out" / ".cap-train.lock").exists()


# ---------------------------------------------------------------- a rank that stops answering (cap_train/watch.py)
LIMIT_MIN = 0.5  # CAP_COLLECTIVE_TIMEOUT_MIN in these tests: every rank must be gone within it + 30 s


def stopping_run(folder: Path, model: Path) -> Path:
    """A long 2-stage run that checkpoints every step (so the line has a checkpoint to name)."""
    return write_config(
        folder, model, max_steps=400, pipeline_stages=2, evals_per_run=0, checkpoint_interval_hours=1e-6
    )


def wait_for_step(out: Path, step: int, procs: list[subprocess.Popen], timeout: float = 120) -> None:
    from tests.test_train_faults import _metrics_step

    deadline = time.monotonic() + timeout
    while _metrics_step(out) < step:
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), outputs(procs, 1)
        time.sleep(0.2)


def torchrun_ranks(port: int, address: str = "127.0.0.1") -> list[dict]:
    common = {"WORLD_SIZE": "2", "MASTER_ADDR": address, "MASTER_PORT": str(port), "TORCHELASTIC_RUN_ID": "w"}
    common["CAP_COLLECTIVE_TIMEOUT_MIN"] = str(LIMIT_MIN)
    return [{**common, "RANK": str(r), "LOCAL_RANK": "0"} for r in (0, 1)]


def assert_names_rank(line: str, rank: int, out: Path) -> None:
    """The one line: the rank that stopped answering, its host, the last step and the checkpoint."""
    assert line.count("\n") == 0 and "Traceback" not in line, line
    assert line.startswith(f"cap-train: rank {rank} on {HOST} stopped answering ("), line
    step = re.search(r"every rank stopped after step (\d+); resume from (\S+) with --resume-from-checkpoint$", line)
    assert step, line
    assert Path(step.group(2)).parent == out / "checkpoints" and int(step.group(1)) >= 2, line


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["SIGKILL", "SIGSTOP"])
def test_a_rank_that_dies_or_stops_ends_every_rank_in_one_line(tmp_path, tiny_model_dir, fault):
    """Two ranks under torchrun's variables; rank 1 is killed (kill -9) or stopped (SIGSTOP) mid-run:
    rank 0 ends within CAP_COLLECTIVE_TIMEOUT_MIN + 30 s with one line naming rank 1, the last
    step and the checkpoint to resume from; a stopped rank 1, continued, ends quietly."""
    cfg = stopping_run(tmp_path, tiny_model_dir("llama"))
    procs = [start_rank(cfg, variables) for variables in torchrun_ranks(free_port())]
    try:
        wait_for_step(tmp_path / "out", 3, procs)
        os.kill(procs[1].pid, getattr(signal, fault))
        # the promise, on a loaded machine too: within the collective timeout + 30 s (a killed rank's line
        # names it only when the heartbeats found it; a failed collective alone names no rank)
        _, err0 = procs[0].communicate(timeout=LIMIT_MIN * 60 + 30)
        assert procs[0].returncode == 4, err0
        assert_names_rank(err0.strip().splitlines()[-1], 1, tmp_path / "out")
        if fault == "SIGSTOP":
            os.kill(procs[1].pid, signal.SIGCONT)
            _, err1 = procs[1].communicate(timeout=60)
            assert procs[1].returncode == 3 and err1.strip() == "", err1
    finally:
        outputs(procs, 1)


def namespace(name: str) -> list[str]:
    return ["ip", "netns", "exec", name]


@pytest.fixture
def two_hosts():
    """Two network namespaces joined by a veth pair (10.77.x.1 and .2), like two nodes whose name
    resolves to 127.0.0.1; yields (namespaces, the link's end in the first, its address)."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2")
    tag = f"{os.getpid() % 10000}"
    names, ends = [f"cap{tag}a", f"cap{tag}b"], [f"cap{tag}x", f"cap{tag}y"]
    subnet = f"10.77.{os.getpid() % 200}"

    def ip(*args):
        return subprocess.run(["ip", *args], capture_output=True, text=True)

    try:
        for n in names:
            if ip("netns", "add", n).returncode:
                pytest.skip("cannot create network namespaces here")
            ip("-n", n, "link", "set", "lo", "up")
        assert ip("link", "add", ends[0], "type", "veth", "peer", "name", ends[1]).returncode == 0
        for n, end, host in zip(names, ends, (1, 2)):
            assert ip("link", "set", end, "netns", n).returncode == 0
            assert ip("-n", n, "addr", "add", f"{subnet}.{host}/24", "dev", end).returncode == 0
            assert ip("-n", n, "link", "set", end, "up").returncode == 0
        yield names, ends[0], f"{subnet}.1"
    finally:
        for n in names:
            ip("netns", "del", n)


@pytest.mark.slow
def test_two_nodes_whose_link_goes_down_end_in_one_line_each(tmp_path, tiny_model_dir, two_hosts):
    """Rank 0 and rank 1 in two network namespaces ("nodes" whose host name resolves to 127.0.0.1, so
    cap picks gloo's interface itself): they train, then the link between them goes down; each side
    ends within CAP_COLLECTIVE_TIMEOUT_MIN + 30 s, naming the other rank in one line."""
    names, link, master = two_hosts
    cfg = stopping_run(tmp_path, tiny_model_dir("llama"))
    procs = []
    for ns, variables in zip(names, torchrun_ranks(free_port(), master)):
        env = {**ENV, "DS_ACCELERATOR": "cpu", **variables}
        procs.append(
            subprocess.Popen(
                namespace(ns) + [sys.executable, "-m", "cap_train.cli", str(cfg)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,
            )
        )
    try:
        wait_for_step(tmp_path / "out", 3, procs)
        subprocess.run(namespace(names[0]) + ["ip", "link", "set", link, "down"], check=True)
        errs = [p.communicate(timeout=LIMIT_MIN * 60 + 30)[1] for p in procs]
        assert [p.returncode for p in procs] == [4, 4], errs
        assert_names_rank(errs[0].strip().splitlines()[-1], 1, tmp_path / "out")
        assert_names_rank(errs[1].strip().splitlines()[-1], 0, tmp_path / "out")
    finally:
        outputs(procs, 1)


# ---------------------------------------------------------------- --hostfile: the launcher, checked first
def fake_programs(folder: Path, **scripts: str) -> dict:
    """ENV with PATH = a folder holding only the given shell scripts (name → body)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, body in scripts.items():
        (folder / name).write_text(f"#!/bin/sh\n{body}\n")
        (folder / name).chmod(0o755)
    return {**ENV, "PATH": str(folder)}


DENIED_ON_NODE2 = 'case "$*" in *node2*) echo "Permission denied (publickey)." >&2; exit 255;; esac'


# pdsh standing in for the nodes' ranks; DeepSpeed's launcher runs it again, with pkill, to stop them
PDSH_RUNS = 'case "$*" in *pkill*) exit 0;; esac; : > {started}; exec {sleep} 120'


def hostfile_run(tmp_path, model, env, *extra, hosts="node1 slots=1\nnode2 slots=1\n") -> subprocess.Popen:
    cfg = write_config(tmp_path, model, max_steps=2, pipeline_stages=2)
    (tmp_path / "hostfile").write_text(hosts)
    return subprocess.Popen(
        CAP_TRAIN + [str(cfg), "--hostfile", str(tmp_path / "hostfile"), "--master-addr", "127.0.0.1", *extra],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


@pytest.mark.parametrize(
    "programs, extra, says",
    [
        ({}, [], "--launcher pdsh: pdsh is not installed on this node"),
        ({}, ["--launcher", "openmpi"], "--launcher openmpi: ompi_info is not installed on this node"),
        ({}, ["--launcher", "slurm"], "--launcher slurm: sinfo is not installed on this node"),
        (
            {
                "pdsh": "exit 0",
                "ssh": 'case "$*" in *node2*) echo "Permission denied (publickey)." >&2; exit 255;; esac',
            },
            [],
            "needs passwordless ssh from this node to every host of",
        ),
    ],
)
def test_a_hostfile_launch_that_cannot_start_says_what_is_missing_before_anything(
    tmp_path, tiny_model_dir, programs, extra, says
):
    """No pdsh, no MPI, no Slurm, or a host without passwordless ssh: one line, exit 2, nothing written."""
    proc = hostfile_run(tmp_path, tiny_model_dir("llama"), fake_programs(tmp_path / "bin", **programs), *extra)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert says in err, err
    if "ssh" in programs:
        assert "node2: Permission denied (publickey)." in err and "node1" not in err.split("fail (")[1], err
    assert not (tmp_path / "out").exists()


def test_the_mpi_launchers_variables_give_each_rank_its_place():
    from cap_train.external import launcher_environment

    ompi = {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1"}
    master = {"MASTER_ADDR": "node1", "MASTER_PORT": "29500"}
    assert launcher_environment({**ompi, **master}) == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", **master}
    assert launcher_environment({"PMI_RANK": "1", "PMI_SIZE": "2", **master})["RANK"] == "1"
    assert launcher_environment(ompi) is None  # without cap-train's MASTER_ADDR: not one of its ranks


@pytest.mark.slow
def test_ctrl_c_under_a_hostfile_is_reported_as_an_interrupt(tmp_path, tiny_model_dir):
    """Ctrl-C while DeepSpeed's launcher runs the nodes (pdsh stands in here): one line saying the
    run was interrupted, exit 130 — not 'a worker failed'."""
    started = tmp_path / "pdsh-started"
    env = fake_programs(
        tmp_path / "bin", pdsh=PDSH_RUNS.format(started=started, sleep=shutil.which("sleep")), ssh="exit 0"
    )
    env["PATH"] += os.pathsep + os.path.dirname(sys.executable)
    proc = hostfile_run(tmp_path, tiny_model_dir("llama"), env)
    try:
        deadline = time.monotonic() + 60
        while not started.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        stop(proc)
    assert proc.returncode == 130, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("cap-train: interrupted (Ctrl-C); every rank stopped before its first step"), err
    assert "a worker failed" not in err and "Traceback" not in err
