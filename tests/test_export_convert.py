"""cap-export conversions at the level of the weights: every stored LoRA pair against the dense
float64 definition (W', (I+W')⁻¹−I, −W', W'·M, best rank-R by a full SVD), and the input /
output handling (folders, mismatches, corrupt files, OUT protection) through the CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from cap_common.adapters.io import lora_key
from cap_export import convert
from cap_export.adapters import load_control
from cap_export.base import Base, writer_keys
from cap_export.cli import main
from cap_export.compat import family_without_base
from tests.test_export_support import ALPHA, LAYERS, RANK, TYPES, dense_w, save_control, single_thread  # noqa: F401

SCALE = ALPHA / RANK
DIRECTIONS = [
    (t, d) for t in TYPES for d in ("forward", "inverse", "negate") if not (t == "spectral" and d == "negate")
]


def run(*args) -> "CliRunner.Result":
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def base_weight(model_dir: Path, name: str) -> torch.Tensor:
    with safe_open(model_dir / "model.safetensors", framework="pt") as f:
        return f.get_tensor(name).double()


def pair(tensors: dict, layer: int, path: str) -> tuple[torch.Tensor, torch.Tensor]:
    return tensors[lora_key(layer, path, "A")].double(), tensors[lora_key(layer, path, "B")].double()


# ---------------------------------------------------------------- multiplicative
@pytest.mark.parametrize("adapter_type,direction", DIRECTIONS)
def test_multiplicative_pairs_equal_w(tmp_path, adapter_type, direction):
    control = load_control(save_control(tmp_path / "ckpt", adapter_type))
    keys = ["self_attn.o_proj.weight", "mlp.down_proj.weight"]
    out = convert.multiplicative(control, lambda layer: keys, "llama", direction, progress=False)
    k = RANK * (2 if adapter_type in ("symmetrise", "antisymmetrise") else 1)
    assert out.config["multiplicative"] is True and out.config["r"] == k and out.config["lora_alpha"] == k
    for layer in LAYERS:
        want = dense_w(control.states[layer], adapter_type, SCALE, direction)
        for path in ("self_attn.o_proj", "mlp.down_proj"):
            A, B = pair(out.tensors, layer, path)
            assert A.shape == (k, 64) and B.shape == (64, k)
            torch.testing.assert_close(B @ A, want, atol=1e-6, rtol=1e-5)


def test_multiplicative_cli_names_mixtral_experts(tmp_path, tiny_model_dir):
    ckpt = save_control(tmp_path / "ckpt", "full")
    with_base = run("multiplicative", ckpt, tmp_path / "a", "--base", tiny_model_dir("mixtral"))
    assert with_base.exit_code == 0, with_base.output
    flag = run("multiplicative", ckpt, tmp_path / "b", "--mixtral", 4)
    assert flag.exit_code == 0, flag.output
    plain = run("multiplicative", ckpt, tmp_path / "c")
    assert plain.exit_code == 0 and "pass --base" in plain.output
    a, b = (
        load_file(tmp_path / "a" / "adapter_model.safetensors"),
        load_file(tmp_path / "b" / "adapter_model.safetensors"),
    )
    assert sorted(a) == sorted(b)
    assert lora_key(1, "block_sparse_moe.experts.3.w2", "A") in a and lora_key(3, "self_attn.o_proj", "B") in a
    assert len(a) == len(LAYERS) * (1 + 4) * 2
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["target_modules"] == ["o_proj", "w2"]
    c = load_file(tmp_path / "c" / "adapter_model.safetensors")
    assert lora_key(1, "mlp.down_proj", "A") in c


def test_family_from_recorded_base(tmp_path, tiny_model_dir):
    ckpt = save_control(tmp_path / "ckpt", "full")
    control = load_control(ckpt)
    control.config["base_model_name_or_path"] = str(tiny_model_dir("mixtral"))
    family, config, _ = family_without_base(control.config, 64, None, False)
    assert family.model_type == "mixtral" and len(writer_keys(family, config)) == 1 + 4


# ---------------------------------------------------------------- additive
@pytest.mark.parametrize("adapter_type,direction", DIRECTIONS)
def test_additive_pairs_equal_w_times_m(tmp_path, tiny_model_dir, adapter_type, direction):
    model = tiny_model_dir("llama")
    control = load_control(save_control(tmp_path / "ckpt", adapter_type))
    out = convert.additive(control, Base(model), direction, progress=False)
    assert out.config["lora_alpha"] == out.config["r"] and "multiplicative" not in out.config
    for layer in LAYERS:
        D = dense_w(control.states[layer], adapter_type, SCALE, direction)
        for path in ("self_attn.o_proj", "mlp.down_proj"):
            M = base_weight(model, f"model.layers.{layer}.{path}.weight")
            A, B = pair(out.tensors, layer, path)
            assert A.shape == (out.config["r"], M.shape[1])
            torch.testing.assert_close(B @ A, D @ M, atol=2e-6, rtol=1e-5)


def test_additive_mixtral_every_expert(tmp_path, tiny_model_dir):
    model = tiny_model_dir("mixtral")
    control = load_control(save_control(tmp_path / "ckpt", "spectral"))
    out = convert.additive(control, Base(model), "inverse", progress=False)
    assert out.config["target_modules"] == ["o_proj", "w2"]
    for layer in LAYERS:
        D = dense_w(control.states[layer], "spectral", SCALE, "inverse")
        for e in range(4):
            path = f"block_sparse_moe.experts.{e}.w2"
            M = base_weight(model, f"model.layers.{layer}.{path}.weight")
            A, B = pair(out.tensors, layer, path)
            torch.testing.assert_close(B @ A, D @ M, atol=2e-6, rtol=1e-5)


def test_additive_reads_fused_expert_checkpoint(tmp_path, tiny_model_dir):
    """A checkpoint saved with transformers v5's fused experts gives the same per-expert LoRA."""
    model = tiny_model_dir("mixtral")
    fused_dir = tmp_path / "fused"
    fused_dir.mkdir()
    tensors = load_file(model / "model.safetensors")
    for layer in range(4):
        prefix = f"model.layers.{layer}."
        w2 = [tensors.pop(f"{prefix}block_sparse_moe.experts.{e}.w2.weight") for e in range(4)]
        tensors[f"{prefix}mlp.experts.down_proj"] = torch.stack(w2)
    save_file(tensors, fused_dir / "model.safetensors")
    (fused_dir / "config.json").write_text((model / "config.json").read_text())
    control = load_control(save_control(tmp_path / "ckpt", "full"))
    want = convert.additive(control, Base(model), progress=False).tensors
    got = convert.additive(control, Base(fused_dir), progress=False).tensors
    assert sorted(got) == sorted(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=0, rtol=0)
    # and a transformers-v5 module name finds the checkpoint's older one (Mixtral's router)
    assert Base(model).locate("model.layers.2.mlp.gate.weight") == (
        "model.layers.2.block_sparse_moe.gate.weight",
        (...,),
    )


@pytest.mark.parametrize("adapter_type", ["full", "symmetrise"])
def test_rank_is_best_rank_r_approximation(tmp_path, tiny_model_dir, adapter_type):
    model = tiny_model_dir("qwen2")
    control = load_control(save_control(tmp_path / "ckpt", adapter_type))
    R = 3
    out = convert.additive(control, Base(model), rank=R, progress=False)
    assert out.config["r"] == R
    for layer in LAYERS:
        D = dense_w(control.states[layer], adapter_type, SCALE)
        for path in ("self_attn.o_proj", "mlp.down_proj"):
            dM = D @ base_weight(model, f"model.layers.{layer}.{path}.weight")
            X, sigma, Yt = torch.linalg.svd(dM, full_matrices=False)
            best = X[:, :R] @ torch.diag(sigma[:R]) @ Yt[:R]
            A, B = pair(out.tensors, layer, path)
            torch.testing.assert_close(B @ A, best, atol=2e-6, rtol=1e-5)
            # and it is really lossy: the dropped singular values are not negligible
            assert float(sigma[R]) > 1e-3
    full = convert.additive(control, Base(model), rank=64, progress=False)
    assert full.config["r"] == RANK * (2 if adapter_type == "symmetrise" else 1)


# ---------------------------------------------------------------- inputs and outputs
def test_checkpoint_folders_and_qlora_pipe_lite_layout(tmp_path, tiny_model_dir):
    model = tiny_model_dir("llama")
    save_control(tmp_path / "step00000010" / "adapter", "full")
    (tmp_path / "step00000010" / "ds").mkdir()
    assert run("additive", model, tmp_path / "step00000010", tmp_path / "o1").exit_code == 0
    (tmp_path / "step00000020" / "ds").mkdir(parents=True)
    r = run("additive", model, tmp_path / "step00000020", tmp_path / "o2")
    assert r.exit_code == 2 and "without an adapter/ subfolder" in r.output
    legacy = load_control(save_control(tmp_path / "legacy", "full", cap_keys=False))
    assert (legacy.adapter_type, legacy.target) == ("full", "block")
    r = run("additive", model, tmp_path / "legacy", tmp_path / "o3")
    assert r.exit_code == 0 and "approximation" in r.output


def _one_error_line(result, *words):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("cap-export: error:")]
    assert len(lines) == 1, result.output
    for word in words:
        assert word in lines[0], lines[0]


def test_bad_inputs_are_one_line(tmp_path, tiny_model_dir):
    llama, cohere = tiny_model_dir("llama"), tiny_model_dir("cohere")
    good = save_control(tmp_path / "good", "full")
    _one_error_line(
        run("additive", llama, save_control(tmp_path / "wide", "full", hidden=96), tmp_path / "o"), "hidden size 96"
    )
    _one_error_line(
        run("additive", llama, save_control(tmp_path / "deep", "full", layers=[1, 7]), tmp_path / "o"), "layer 7"
    )
    _one_error_line(run("additive", llama, tmp_path / "missing", tmp_path / "o"), "not found")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "adapter_config.json").write_text("{}")
    _one_error_line(run("additive", llama, tmp_path / "half", tmp_path / "o"), "adapter_model.safetensors")
    corrupt = save_control(tmp_path / "corrupt", "full")
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    _one_error_line(run("additive", llama, corrupt, tmp_path / "o"), "safetensors")
    _one_error_line(run("additive", tmp_path / "nobase", good, tmp_path / "o"), "not found")
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text((llama / "config.json").read_text())
    (sharded / "model-00001-of-00001.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00garbage!")
    (sharded / "model.safetensors.index.json").write_text(
        json.dumps(
            {
                "weight_map": {
                    f"model.layers.{i}.{m}.weight": "model-00001-of-00001.safetensors"
                    for i in range(4)
                    for m in ("self_attn.o_proj", "mlp.down_proj")
                }
            }
        )
    )
    _one_error_line(run("additive", sharded, good, tmp_path / "o"), "not a readable safetensors file")
    # A LoRA where a Control Adapter is expected, and the other way round.
    assert run("additive", llama, good, tmp_path / "lora").exit_code == 0
    _one_error_line(run("additive", llama, tmp_path / "lora", tmp_path / "o"), "not a Control Adapter")
    _one_error_line(run("merge", llama, good, tmp_path / "o"), "not a LoRA")
    # A LoRA made for llama merged into cohere: refused by its record.
    _one_error_line(run("merge", cohere, tmp_path / "lora", tmp_path / "o"), "made for a llama model")
    _one_error_line(
        run("additive", llama, good, tmp_path / "o", "--inverse", "--exact-inverse"),
        "--inverse and --exact-inverse exclude each other",
    )
    assert not (tmp_path / "o").exists()


def test_out_is_protected_and_never_half_written(tmp_path, tiny_model_dir, monkeypatch):
    model = tiny_model_dir("llama")
    ckpt = save_control(tmp_path / "ckpt", "full")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _one_error_line(run("additive", model, ckpt, out), "--force")
    assert (out / "keep.txt").read_text() == "mine"

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(convert, "thin_svd_truncate", boom)
    with pytest.raises(RuntimeError):
        run("additive", model, ckpt, out, "--force", "--rank", 2)
    assert sorted(os.listdir(out)) == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "out"]  # no temp folder left behind
    monkeypatch.undo()
    assert run("additive", model, ckpt, out, "--force").exit_code == 0
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors", "cap_export.json"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run("multiplicative", ckpt, empty).exit_code == 0


def test_compatibility_flags_are_accepted(tmp_path, tiny_model_dir):
    ckpt = save_control(tmp_path / "ckpt", "full")
    r = run("additive", tiny_model_dir("cohere"), ckpt, tmp_path / "o", "--cohere")
    assert r.exit_code == 0 and "--cohere is not needed" in r.output
