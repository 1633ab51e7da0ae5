"""cap-train end to end on tiny models, through the real CLI and DeepSpeed's launcher (gloo on CPU)."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cap_train.order import TrainOrder
from cap_train.schedule import lr_at
from cap_train.trainer import eval_steps
from tests.assets import sample_text
from tests.zygote import Zygote

CAP_TRAIN = [sys.executable, "-m", "cap_train.cli"]
# Runs are forked from a zygote (tests/zygote.py) on CPU only: a fork must not inherit a GPU context.
FORK = os.environ.get("DS_ACCELERATOR", "cpu") == "cpu" and not torch.cuda.is_available()
# Tiny models gain nothing from threads, and on a loaded 2-core machine OpenMP's waiting makes
# every small matmul many times slower: one thread per process (cap-train keeps the user's setting).
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def write_config(folder: Path, model: Path, **keys) -> Path:
    """A config over two small datasets (+1 and −1 when control adapters are on)."""
    data = folder / "data"
    data.mkdir(parents=True, exist_ok=True)
    lines = sample_text(240, seed=5)
    (data / "pos.jsonl").write_text(
        "".join(json.dumps({"text": " ".join(lines[i : i + 3]).upper()}) + "\n" for i in range(0, 120, 3))
    )
    (data / "neg.jsonl").write_text(
        "".join(json.dumps({"text": " ".join(lines[i : i + 3])}) + "\n" for i in range(120, 240, 3))
    )
    control = keys.get("use_control_adapters", False)
    base = dict(
        model_dir=str(model),
        output_dir=str(folder / "out"),
        lr=2e-3,
        sequence_len=32,
        lora_rank=4,
        gradient_accumulation_steps=2,
        micro_batch_size=2,
        eval_fraction=0.2,
        evals_per_run=3,
        model_dtype="float32",
        seed=7,
        max_grad_norm=1.0,
        warmup="none",
    )
    base.update(keys)
    toml = "".join(f"{k} = {json.dumps(v) if not isinstance(v, bool) else str(v).lower()}\n" for k, v in base.items())
    toml += "[[datasets]]\ndataset_path = 'data/pos.jsonl'\ncontrol_class = 1\n"
    toml += f"[[datasets]]\ndataset_path = 'data/neg.jsonl'\ncontrol_class = {-1 if control else 1}\n"
    path = folder / "cfg.toml"
    path.write_text(toml)
    return path


def free_port() -> int:
    """A port nobody listens on now (DeepSpeed's rendezvous binds it)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_train(
    cfg: Path, procs: int = 1, *extra, check=True, port=None, timeout=600, forked=True
) -> subprocess.CompletedProcess:
    """`cap-train CFG --num-gpus PROCS EXTRA…` to its end: its exit code, stdout and stderr. `forked`: started
    by a zygote (tests/zygote.py: the same launcher and workers, without their imports); else a subprocess."""
    args = [str(cfg), "--num-gpus", str(procs), "--master-port", str(port or free_port()), *extra]
    if not (forked and FORK):
        out = subprocess.run(CAP_TRAIN + args, capture_output=True, text=True, timeout=timeout, env=ENV)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            stdout, stderr = Path(tmp) / "stdout", Path(tmp) / "stderr"
            proc = Zygote.get(ENV).start(args, ENV, stdout, stderr)
            try:
                code = proc.wait(timeout)
            finally:
                stop(proc)
            out = subprocess.CompletedProcess(CAP_TRAIN + args, code, stdout.read_text(), stderr.read_text())
    if check:
        assert out.returncode == 0, out.stderr[-3000:]
    return out


def start_train(cfg: Path, procs: int = 1, *extra, env: dict | None = None, forked=True):
    """run_train without waiting (stderr to CFG.err): a few small runs side by side use both cores,
    where one run's start-up is mostly serial Python. `env`: variables added to ENV. A forked run
    (tests/zygote.py) is no child of this process; it has what the tests use of Popen."""
    args = [str(cfg), "--num-gpus", str(procs), "--master-port", str(free_port()), *extra]
    env = {**ENV, **(env or {})}
    if forked and FORK:
        proc = Zygote.get(env).start(args, env, None, cfg.with_suffix(".err"))
    else:
        with open(cfg.with_suffix(".err"), "w") as err:
            proc = subprocess.Popen(
                CAP_TRAIN + args, stdout=subprocess.DEVNULL, stderr=err, env=env, start_new_session=True
            )
    proc.err_path = cfg.with_suffix(".err")
    return proc


def finish(*procs: subprocess.Popen, timeout: float = 600) -> None:
    """Wait for every run; whatever still runs when this ends (a failure, a timeout) is killed."""
    try:
        for proc in procs:
            assert proc.wait(timeout=timeout) == 0, proc.err_path.read_text()[-3000:]
    finally:
        for proc in procs:
            stop(proc)


def stop(proc: subprocess.Popen) -> None:
    """Kill the process group `proc` leads (started with start_new_session) if it still runs; reap it."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def metrics(out_dir: Path) -> dict[int, dict]:
    """Last record per step of metrics.jsonl (a resumed run may redo steps)."""
    rows = {}
    for line in (out_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        rows.setdefault(rec["step"], {}).update(rec)
    return rows


# ---------------------------------------------------------------- fast unit tests
def test_rms_ratio_warmup_and_cosine():
    assert lr_at(1, 100, lr=1.0, beta2=0.99) == pytest.approx(((1 - 0.99) / (1 + 0.99)) ** 0.5)
    assert lr_at(10_000, 20_000, lr=1.0, beta2=0.99) == pytest.approx(1.0)
    # linear warmup over 10 of 100 steps, then cosine to min_lr
    kw = dict(lr=1.0, beta2=0.99, warmup="linear", warmup_fraction=0.1, lr_scheduler="cosine", min_lr=0.1)
    assert lr_at(5, 100, **kw) == pytest.approx(0.5)
    assert lr_at(10, 100, **kw) == pytest.approx(1.0)
    assert lr_at(55, 100, **kw) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_at(100, 100, **kw) == pytest.approx(0.1)


def test_order_is_a_partition_reshuffled_per_epoch():
    orders = [TrainOrder(103, r, 3, seed=1, micro_batch_size=2, accumulation=4) for r in range(3)]
    e0 = [o.rows(0) for o in orders]
    assert all(r.shape == (4, 4, 2) for r in e0)  # 103 // (3·8) = 4 steps
    flat = torch.tensor(sorted(int(i) for r in e0 for i in r.reshape(-1)))
    assert len(set(flat.tolist())) == 96 and flat.max() < 103  # disjoint ranks
    assert not (orders[0].rows(1) == e0[0]).all()  # reshuffled
    assert (orders[0].rows(0) == TrainOrder(103, 0, 3, 1, 2, 4).rows(0)).all()  # deterministic
    resumed = [tuple(r) for _, r in orders[1].micro_batches(0, start_step=2)]
    assert resumed == [tuple(r) for r in e0[1][2:].reshape(-1, 2)]
    # one global order: 2 replicas × 1 micro batch of 4 read, step by step, the rows 1 replica × 2 of 4 reads
    perm = np.random.Generator(np.random.PCG64([1, 0])).permutation(103)
    one = TrainOrder(103, 0, 1, seed=1, micro_batch_size=4, accumulation=2).rows(0).reshape(12, -1)
    two = np.stack([TrainOrder(103, k, 2, 1, 4, 1).rows(0).reshape(12, -1) for k in range(2)], 1).reshape(12, -1)
    assert (one == two).all() and (one.reshape(-1) == perm[:96]).all()


def test_resume_plan_groups_the_changed_keys():
    """Applied keys pass; data and model keys need the flag (data restarts the epoch); fixed never."""
    from cap_common.errors import CapError
    from cap_train.resume import plan

    old = {
        "lr": 1e-3,
        "epochs": 1,
        "data": "a",
        "lora_alpha": 4.0,
        "lora_rank": 4,
        "processes": 2,
        "global batch": 4,
        "model shape": {"hidden_size": 64},
    }
    same = plan(old, dict(old), False, "ckpt")
    assert not same.applied and not same.accepted and not same.restart_epoch
    p = plan(old, {**old, "lr": 5e-4, "epochs": 3, "processes": 4}, False, "ckpt")
    assert [str(c) for c in p.applied] == ["lr 0.001 → 0.0005", "epochs 1 → 3", "processes 2 → 4"]
    assert not p.restart_epoch
    for changed, restart in (({"data": "b"}, True), ({"global batch": 8}, True), ({"lora_alpha": 8.0}, False)):
        with pytest.raises(CapError, match="--accept-config-change"):
            plan(old, {**old, **changed}, False, "ckpt")
        assert plan(old, {**old, **changed}, True, "ckpt").restart_epoch is restart
    for changed in ({"lora_rank": 8}, {"model shape": {"hidden_size": 128}}):
        with pytest.raises(CapError, match="cannot resume"):
            plan(old, {**old, **changed}, True, "ckpt")
    # a key the checkpoint did not record, or an unknown new value, is not compared
    assert not plan(old, {**old, "processes": None, "seed": 3}, False, "ckpt").accepted


def test_a_rank_that_lost_its_peer_is_not_blamed():
    import torch.distributed as dist

    from cap_train.launch import Failure, _cause
    from cap_train.logs import EXIT_CRASH, EXIT_PEER_LOST, lost_peer

    assert lost_peer(RuntimeError("[../gloo/transport/tcp/pair.cc:537] Read error: Connection reset by peer"))
    assert lost_peer(dist.DistBackendError("NCCL communicator was aborted"))
    assert not lost_peer(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not lost_peer(ValueError("Connection reset by peer"))  # not a communication error type
    cause = _cause([Failure(0, 10, EXIT_PEER_LOST), Failure(1, 11, -9), Failure(2, 12, EXIT_CRASH)])
    assert cause.rank == 1 and "killed by SIGKILL (signal 9)" in cause.describe()
    assert _cause([Failure(3, 13, EXIT_PEER_LOST)]).rank == 3


def test_eval_steps_include_first_and_last():
    assert eval_steps(11, 100) == {0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100}
    assert eval_steps(2, 7) == {0, 7}
    assert eval_steps(0, 7) == set()


# ---------------------------------------------------------------- end to end (slow)
@pytest.mark.slow
def test_control_adapter_training_one_vs_two_stages(tmp_path, tiny_model_dir, monkeypatch):
    """1 process and 2 processes × 2 stages give the same losses; losses fall; adapters help both classes.
    Step 3 is profiled (CAP_PROFILE) on rank 0 of each run."""
    monkeypatch.setattr(sys.modules[__name__], "ENV", {**ENV, "CAP_PROFILE": "3"})
    model = tiny_model_dir("llama")
    procs = [
        start_train(
            write_config(
                tmp_path / f"p{n}",
                model,
                use_control_adapters=True,
                pipeline_stages=stages,
                epochs=2,
                lr=5e-3,
                activation_checkpointing=stages == 2,
            ),
            n,
        )
        for n, stages in ((1, 1), (2, 2))
    ]  # side by side
    finish(*procs)
    one, two = metrics(tmp_path / "p1" / "out"), metrics(tmp_path / "p2" / "out")
    steps = sorted(s for s in one if s > 0)
    assert len(steps) >= 6
    l1 = [one[s]["train/loss"] for s in steps]
    l2 = [two[s]["train/loss"] for s in steps]
    assert l1 == pytest.approx(l2, rel=1e-4, abs=1e-5)
    first, last = one[0], one[steps[-1]]
    assert last["eval/loss_class+1"] < first["eval/loss_class+1"]
    assert last["eval/loss_class-1"] < first["eval/loss_class-1"]
    assert sum(l1[-3:]) < sum(l1[:3])
    # outputs: final adapter in cap's key layout (docs/formats.md, section 4), config beside it
    out = tmp_path / "p1" / "out"
    tensors = load_file(str(out / "epoch2" / "adapter_model.safetensors"))
    assert set(tensors) == {f"base_model.model.model.layers.{i}.control_{x}.weight" for i in range(4) for x in "AB"}
    conf = json.loads((out / "epoch2" / "adapter_config.json").read_text())
    assert conf["control_adapter_type"] == "full" and conf["r"] == 4
    # the profile of step 3: the one-stage run's ops by category (self CPU time), none of them idle
    for run, expect in (("p1", {"matmul", "attention", "loss", "optimizer"}), ("p2", {"matmul", "attention"})):
        profile = json.loads((tmp_path / run / "out" / "profile-step3.json").read_text())
        assert profile["device"] == "cpu" and expect <= set(profile["categories"]), (run, profile)
        assert sum(profile["categories"].values()) == pytest.approx(profile["busy_ms"])
        assert 0 < profile["busy_ms"] and 0 < profile["wall_ms"]
    # TensorBoard has the named scalars
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in (
        "train/loss",
        "train/lr",
        "train/grad_norm",
        "train/tokens_per_s",
        "eval/loss_all",
        "eval/loss_class+1",
        "eval/loss_class-1",
        "adapter/frobenius/layer000",
        "adapter/spectral/layer003",
    ):
        assert tag in tags


def _wait_for(pred, proc, timeout=300):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if pred():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.005)
    return False


# A checkpoint after nearly every step (0.036 s), 60 steps over the epoch boundary (~47 steps/epoch).
RESUME_KEYS = dict(
    use_control_adapters=True,
    epochs=2,
    max_steps=60,
    lora_dropout=0.1,
    checkpoint_interval_hours=1e-9,  # ~4 µs: a checkpoint after every step
    evals_per_run=0,
    lr=3e-3,
)
STEPS = 60


def _step_of(path: Path) -> int:
    return int(path.name.rsplit("step", 1)[1])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model_dir):
    """The reference: the same run without interruption."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    run_train(write_config(folder, tiny_model_dir("llama"), **RESUME_KEYS))
    return folder / "out"


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", ["after_checkpoint", "during_checkpoint"])
def test_resume_after_sigkill_is_bitwise_exact(tmp_path, tiny_model_dir, uninterrupted, kill_at):
    """kill -9 mid-run (also mid-checkpoint-write), resume: same weights bit for bit, same data read."""
    cfg = write_config(tmp_path, tiny_model_dir("llama"), **RESUME_KEYS)
    ckpts = tmp_path / "out" / "checkpoints"
    log = tmp_path / "killed-run.log"
    with open(log, "w") as err:
        proc = subprocess.Popen(
            CAP_TRAIN + [str(cfg), "--master-port", str(free_port())],
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=ENV,
        )
        if kill_at == "after_checkpoint":  # in epoch 1
            seen = _wait_for(lambda: any(_step_of(p) >= 20 for p in ckpts.glob("step*")), proc)
        else:  # while a checkpoint in epoch 2 is being written
            seen = _wait_for(lambda: any(_step_of(p) >= 50 for p in ckpts.glob(".tmp-step*")), proc)
        stop(proc)
    assert seen, "the run ended before the kill point: " + log.read_text()[-2000:]
    run_train(cfg, 1, "--resume-from-checkpoint")
    name = "epoch2/adapter_model.safetensors"
    a, b = load_file(str(uninterrupted / name)), load_file(str(tmp_path / "out" / name))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ref, got = metrics(uninterrupted), metrics(tmp_path / "out")
    assert sorted(ref) == sorted(got) == list(range(1, STEPS + 1))
    for s in ref:
        assert ref[s]["data/rows_checksum"] == got[s]["data/rows_checksum"]
        assert ref[s]["train/loss"] == got[s]["train/loss"]


@pytest.mark.slow
def test_bad_config_and_non_finite_loss_stop_cleanly(tmp_path, tiny_model_dir):
    model = tiny_model_dir("llama")
    cfg = write_config(tmp_path, model, use_control_adapters=True, pipeline_stages=2)
    out = run_train(cfg, 1, check=False)
    assert out.returncode == 2 and "pipeline_stages = 2 must divide the world size" in out.stderr
    # A base whose embeddings are NaN: the first loss is NaN, and the run must stop, not train on.
    import shutil

    from safetensors.torch import save_file

    broken = tmp_path / "broken"
    shutil.copytree(model, broken)
    weights = load_file(str(broken / "model.safetensors"))
    weights["model.embed_tokens.weight"][:] = float("nan")
    save_file(weights, str(broken / "model.safetensors"), metadata={"format": "pt"})
    cfg = write_config(tmp_path / "nan", broken, use_control_adapters=True, evals_per_run=0)
    out = run_train(cfg, 1, check=False)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "non-finite loss at step 1; stopped without saving. Last good checkpoint: none" in out.stderr
    assert not list((tmp_path / "nan" / "out").glob("epoch*"))
