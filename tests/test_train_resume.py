"""Resume as users meet it: a changed config (applied, refused, or accepted with a flag), damaged
checkpoints (the previous complete one is used), and a fresh run that would mix with an old one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.test_train import finish, metrics, run_train, start_train, write_config

pytestmark = pytest.mark.slow

# A checkpoint after every step; 4 steps, then resumed to 6.
KEYS = dict(
    use_control_adapters=True,
    lora_dropout=0.1,
    checkpoint_interval_hours=1e-9,  # ~4 µs: a checkpoint after every step
    evals_per_run=0,
    lr=3e-3,
    max_checkpoints=3,
)
ADAPTER = "epoch1/adapter_model.safetensors"


def _config(folder: Path, model: Path, **keys) -> Path:
    return write_config(folder, model, **{**KEYS, **keys})


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    """(a run stopped at step 4 by max_steps, with checkpoints kept for steps 2, 3 and 4;
    the same run to step 6 without interruption), run side by side."""
    first, reference = tmp_path_factory.mktemp("first"), tmp_path_factory.mktemp("reference")
    model = tiny_model_dir("llama")
    finish(start_train(_config(first, model, max_steps=4)), start_train(_config(reference, model, max_steps=6)))
    assert sorted(p.name for p in (first / "out" / "checkpoints").glob("step*")) == [
        "step00000002",
        "step00000003",
        "step00000004",
    ]
    return first, reference / "out"


@pytest.fixture
def first_run(runs):
    return runs[0]


@pytest.fixture
def reference(runs):
    return runs[1]


def _copy(first_run: Path, tmp_path: Path) -> Path:
    """A copy of the first run's folder (data, config, output) whose config points at the copy."""
    shutil.copytree(first_run, tmp_path / "run", symlinks=True)
    # the copied config's paths point into first_run: rewrite them to the copy
    cfg = tmp_path / "run" / "cfg.toml"
    cfg.write_text(cfg.read_text().replace(str(first_run), str(tmp_path / "run")))
    return tmp_path / "run"


def _resume(folder: Path, model: Path, *extra, check=True, **keys):
    cfg = _config(folder, model, **{"max_steps": 6, **keys})
    return run_train(cfg, 1, "--resume-from-checkpoint", *extra, check=check)


def _assert_same_weights(a_dir: Path, b_dir: Path) -> None:
    a, b = load_file(str(a_dir / ADAPTER)), load_file(str(b_dir / ADAPTER))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_applies_a_new_lr_from_the_next_step(first_run, tmp_path, tiny_model_dir):
    """The non-finite-loss message tells users to lower lr and resume: the new lr must be used."""
    run = _copy(first_run, tmp_path)
    out = _resume(run, tiny_model_dir("llama"), lr=1e-3)
    assert "lr 0.003 → 0.001" in out.stderr and "max_steps 4 → 6" in out.stderr
    rec = metrics(run / "out")
    assert [rec[s]["train/lr"] for s in range(1, 7)] == pytest.approx([3e-3] * 4 + [1e-3] * 2, rel=1e-12)
    state = json.loads((run / "out" / "checkpoints" / "step00000006" / "state.json").read_text())
    assert state["run"]["lr"] == 1e-3


DAMAGES = ("truncated", "empty_state", "missing_rng", "flipped_byte")


@pytest.fixture(scope="module")
def damaged(runs, tmp_path_factory, tiny_model_dir):
    """A copy of the first run per kind of damage to its newest checkpoint, each resumed to step 6
    (two at a time): {damage: (finished process, run folder)}."""
    first, _ = runs
    model = tiny_model_dir("llama")
    resumed = {}
    for damage in DAMAGES:
        run = _copy(first, tmp_path_factory.mktemp(damage))
        newest = run / "out" / "checkpoints" / "step00000004"
        victim = max((p for p in newest.rglob("*.safetensors")), key=lambda p: p.stat().st_size)
        if damage == "truncated":
            victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
        elif damage == "empty_state":
            (newest / "state.json").write_text("")
        elif damage == "missing_rng":
            (newest / "rng-rank0.safetensors").unlink()
        else:
            data = bytearray(victim.read_bytes())
            data[len(data) // 2] ^= 0x01
            victim.write_bytes(bytes(data))
        resumed[damage] = (start_train(_config(run, model, max_steps=6), 1, "--resume-from-checkpoint"), run)
        if len(resumed) % 2 == 0:
            for proc, _ in list(resumed.values())[-2:]:
                proc.wait(timeout=600)
    return resumed


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_newest_checkpoint_resumes_from_the_previous(damaged, reference, damage):
    proc, run = damaged[damage]
    err = proc.err_path.read_text()
    assert proc.wait(timeout=600) == 0, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("cap-train: checkpoint")]
    assert len(lines) == 1 and "step00000004" in lines[0] and "Traceback" not in err
    assert "resumed from" in err and "step00000003" in err
    assert (run / "out" / "checkpoints" / ".damaged-step00000004").is_dir()
    _assert_same_weights(reference, run / "out")
    rec, ref = metrics(run / "out"), metrics(reference)
    for s in (4, 5, 6):  # step 4 was redone from checkpoint 3: the same data and the same loss
        assert rec[s]["data/rows_checksum"] == ref[s]["data/rows_checksum"]
        assert rec[s]["train/loss"] == ref[s]["train/loss"]


@pytest.mark.parametrize(
    "change",
    [
        dict(lora_rank=8),
        dict(layers_to_transform="0:1"),
        dict(use_control_adapters=False),
        dict(control_adapter_type="spectral"),
    ],
)
def test_a_change_that_breaks_the_checkpoint_is_one_line(first_run, tmp_path, tiny_model_dir, change):
    run = _copy(first_run, tmp_path)
    before = sorted(p.name for p in (run / "out").rglob("*"))
    for extra in ((), ("--accept-config-change",)):
        out = _resume(run, tiny_model_dir("llama"), *extra, check=False, **change)
        assert out.returncode == 2, out.stderr[-2000:]
        errors = [line for line in out.stderr.splitlines() if line.startswith("cap-train: error")]
        assert len(errors) == 1 and "Traceback" not in out.stderr, out.stderr
        key = next(iter(change))
        assert f"{key} " in errors[0] and "→" in errors[0] and "cannot resume" in errors[0]
    assert sorted(p.name for p in (run / "out").rglob("*")) == before  # nothing touched


def test_changed_data_needs_the_flag_then_restarts_the_epoch(first_run, tmp_path, tiny_model_dir):
    """A smaller dataset: refused in one line; accepted, it trains from the start of the epoch in the
    new data's order (an IndexError or a silent 'done' before)."""
    run = _copy(first_run, tmp_path)
    model = tiny_model_dir("llama")
    cfg = _config(run, model, max_steps=6)  # rewrites the data files as they were
    pos = run / "data" / "pos.jsonl"
    pos.write_text("".join(pos.read_text().splitlines(keepends=True)[:10]))
    out = run_train(cfg, 1, "--resume-from-checkpoint", check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    error = [line for line in out.stderr.splitlines() if line.startswith("cap-train: error")]
    assert len(error) == 1 and "data " in error[0] and "--accept-config-change" in error[0]
    out = run_train(cfg, 1, "--resume-from-checkpoint", "--accept-config-change")
    assert "the data restarts at the start of the current epoch" in out.stderr
    rec = metrics(run / "out")
    assert sorted(rec) == [1, 2, 3, 4, 5, 6]

    # step 5 is the new order's first step of epoch 0: rows perm[0:4] of a PCG64([seed, epoch]) permutation
    def train_rows(folder):
        return json.loads((folder / "manifest.json").read_text())["splits"]["train"]["sequences"]

    prepared = [p for p in (run / "out" / "prepared").iterdir() if (p / "manifest.json").is_file()]
    small = min(prepared, key=train_rows)
    rows = np.random.Generator(np.random.PCG64([7, 0])).permutation(train_rows(small))[:4]
    assert rec[5]["data/rows_checksum"] == float(((rows + 1) * (1 + np.arange(4))).sum())
    state = json.loads((run / "out" / "checkpoints" / "step00000006" / "state.json").read_text())
    assert state["step"] == 6


def test_a_fresh_run_does_not_mix_with_an_earlier_one(first_run, tmp_path, tiny_model_dir):
    run = _copy(first_run, tmp_path)
    before = sorted(p.name for p in (run / "out" / "checkpoints").iterdir())
    out = run_train(_config(run, tiny_model_dir("llama"), max_steps=4), 1, check=False)
    assert out.returncode == 2 and "holds checkpoints of an earlier run" in out.stderr
    assert sorted(p.name for p in (run / "out" / "checkpoints").iterdir()) == before
