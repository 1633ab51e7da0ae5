"""Values qlora-pipe-lite's configs use, through real cap-train runs: a full fine-tune restricted by
target_modules and layers_to_transform trains exactly the selected weights (every other tensor of
the written model is the base's, byte for byte); max_checkpoints = 0 keeps every checkpoint."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.test_train import finish, start_train, write_config

pytestmark = pytest.mark.slow


def saved_tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(path)))
    return out


def test_restricted_full_fine_tune_trains_only_the_selected_weights(tmp_path, tiny_model_dir):
    model = tiny_model_dir("llama")
    full = write_config(
        tmp_path / "full",
        model,
        full_fine_tune=True,
        lr=1e-3,
        target_modules=["o_proj"],
        layers_to_transform="1:1",
        max_steps=4,
        max_checkpoints=0,
        checkpoint_interval_hours=1e-9,  # ~4 µs: a checkpoint after every step
    )
    finish(start_train(full))

    base = saved_tensors(model)
    trained = saved_tensors(tmp_path / "full" / "out" / "epoch1")
    changed = sorted(k for k in base if not torch.equal(base[k], trained[k].to(base[k].dtype)))
    assert changed == ["model.layers.1.self_attn.o_proj.weight"]
    steps = sorted(p.name for p in (tmp_path / "full" / "out" / "checkpoints").glob("step*"))
    assert steps == [f"step{s:08d}" for s in range(1, 5)]  # none pruned
