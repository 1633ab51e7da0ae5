"""Checkpoints that resume on another topology: a run checkpointed on 1 process continues on
2 processes × 2 pipeline stages, and one checkpointed on 2 × 2 continues on 1. Both must end with
the adapter of an uninterrupted run (same global batch), and read the same stream of sequences —
checked against the order re-derived here from the Arrow shards (numpy's PCG64 permutation per
epoch, consecutive global batches), not against cap-train's own bookkeeping. A checkpoint's
files read with safetensors and JSON alone (no pickle)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.test_train import finish, metrics, start_train, write_config

pytestmark = pytest.mark.slow

KEYS = dict(
    use_control_adapters=True,
    checkpoint_interval_hours=1e-9,  # a checkpoint after every step
    max_checkpoints=0,
    evals_per_run=0,
    lr=3e-3,
)
STOP, END = 3, 6


def expected_checksums(prepared, seed: int, global_batch: int, steps: int) -> list[float]:
    """Per step: Σ_g Σ_t (id + 1)(t + 1)(g + 1) over the step's rows g = 0..G−1 in order."""
    folder = next(p for p in prepared.iterdir() if (p / "manifest.json").is_file())
    manifest = json.loads((folder / "manifest.json").read_text())
    L = manifest["sequence_len"]
    ids = np.concatenate(
        [
            pa.ipc.open_file(pa.memory_map(str(folder / s["file"])))
            .read_all()
            .column("input_ids")
            .combine_chunks()
            .flatten()
            .to_numpy()
            .reshape(-1, L)
            for s in manifest["splits"]["train"]["shards"]
        ]
    ).astype(np.float64)
    per_epoch = len(ids) // global_batch
    out = []
    for s in range(steps):
        epoch, k = divmod(s, per_epoch)
        perm = np.random.Generator(np.random.PCG64([seed, epoch])).permutation(len(ids))
        rows = perm[k * global_batch : (k + 1) * global_batch]
        weights = np.outer(np.arange(1, global_batch + 1), np.arange(1, L + 1))
        out.append(float(((ids[rows] + 1) * weights).sum()))
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    """{name: output_dir}: the uninterrupted run, and the two interrupted ones after their resume."""
    model = tiny_model_dir("llama")
    root = tmp_path_factory.mktemp("topology")
    ref = write_config(root / "ref", model, max_steps=END, **KEYS)
    a = write_config(root / "a", model, max_steps=STOP, **KEYS)
    b = write_config(root / "b", model, max_steps=STOP, pipeline_stages=2, **KEYS)
    finish(start_train(ref, 1), start_train(a, 1), start_train(b, 2))
    a2 = write_config(root / "a", model, max_steps=END, pipeline_stages=2, **KEYS)
    b2 = write_config(root / "b", model, max_steps=END, **KEYS)
    resumed = [start_train(a2, 2, "--resume-from-checkpoint"), start_train(b2, 1, "--resume-from-checkpoint")]
    finish(*resumed)
    for proc, change in zip(resumed, ("1 → 2", "2 → 1")):
        said = proc.err_path.read_text()
        assert f"pipeline_stages {change}" in said and f"processes {change}" in said, said[-2000:]
    return {"ref": root / "ref" / "out", "1->2x2": root / "a" / "out", "2x2->1": root / "b" / "out"}


@pytest.mark.parametrize("name", ["1->2x2", "2x2->1"])
def test_a_checkpoint_resumes_on_another_topology(runs, name):
    ref, got = metrics(runs["ref"]), metrics(runs[name])
    want = expected_checksums(runs["ref"] / "prepared", seed=7, global_batch=2 * 2, steps=END)
    assert [ref[s]["data/tokens_checksum"] for s in range(1, END + 1)] == want
    assert [got[s]["data/tokens_checksum"] for s in range(1, END + 1)] == want
    for s in range(1, END + 1):
        assert got[s]["train/loss"] == pytest.approx(ref[s]["train/loss"], rel=1e-4), s
    a = load_file(str(runs["ref"] / "epoch1" / "adapter_model.safetensors"))
    b = load_file(str(runs[name] / "epoch1" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6)
    assert any(not torch.equal(a[k], torch.zeros_like(a[k])) for k in a)  # the adapter trained


def test_a_checkpoint_reads_without_pickle(runs):
    """Every file of a checkpoint is JSON or safetensors; the weights and Adam moments are there by
    name; the RNG files too."""
    checkpoint = runs["2x2->1"] / "checkpoints" / f"step{STOP:08d}"
    names = sorted(p.name for p in checkpoint.iterdir())
    assert names == [
        "rng-rank0.safetensors",
        "rng-rank1.safetensors",
        "state.json",
        "trainable-stage0.safetensors",
        "trainable-stage1.safetensors",
    ]
    state = json.loads((checkpoint / "state.json").read_text())
    assert state["format"] == 3 and state["step"] == STOP and state["global_batch"] == 4
    keys = set()
    for part in ("trainable-stage0.safetensors", "trainable-stage1.safetensors"):
        with safe_open(str(checkpoint / part), framework="np") as f:
            keys |= set(f.keys())
            assert json.loads(f.metadata()["optimizer"])["step"] == STOP
    weights = {k for k in keys if "#" not in k}
    assert len(weights) == 4 * 2  # control_A and control_B on each of the 4 layers
    assert keys == weights | {f"{k}#{s}" for k in weights for s in ("exp_avg", "exp_avg_sq")}
    with safe_open(str(checkpoint / "rng-rank1.safetensors"), framework="np") as f:
        assert f.get_tensor("torch").dtype == np.uint8 and json.loads(f.metadata()["python"])[0] == 3
