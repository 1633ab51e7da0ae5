"""cap-export inspect: per-layer norms and singular values of Control Adapters and PEFT LoRAs, checked
against torch.linalg.svdvals of the dense float64 matrix built from the saved tensors."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cap_common.adapters.io import control_tensors, lora_key, save_adapter
from cap_export.cli import main
from tests.test_export_support import (  # noqa: F401
    ALPHA,
    LAYERS,
    RANK,
    TYPES,
    dense_w,
    random_states,
    save_control,
    single_thread,
)

SCALE = ALPHA / RANK
# module path → (out, in); the LoRA test folder has them on layers 0 and 2
MODULES = {"self_attn.q_proj": (64, 64), "mlp.down_proj": (64, 96), "mlp.up_proj": (96, 64)}
LORA_R, LORA_ALPHA, DOWN_ALPHA = 4, 8.0, 2.0


def run(*args):
    return CliRunner().invoke(main, ["inspect", *(str(a) for a in args)], catch_exceptions=False)


def inspect_json(*args) -> dict:
    result = run(*args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def reference(W: torch.Tensor) -> dict:
    """The quantities inspect reports, from the dense matrix."""
    sigma = torch.linalg.svdvals(W)
    p = sigma[sigma > 0] / sigma.sum()
    return {
        "frobenius": float(torch.linalg.matrix_norm(W)),
        "spectral": float(torch.linalg.matrix_norm(W, ord=2)),
        "sigma": sigma,
        "erank": float(torch.exp(-(p * p.log()).sum())),
        "above": int((sigma > 0.01 * sigma[0]).sum()),
    }


def check_row(row: dict, W: torch.Tensor, top: int = 8) -> None:
    ref = reference(W)
    assert row["frobenius"] == pytest.approx(ref["frobenius"], rel=1e-10)
    assert row["spectral"] == pytest.approx(ref["spectral"], rel=1e-10)
    shown = min(top, row["rank"])
    assert len(row["singular_values"]) == shown
    torch.testing.assert_close(
        torch.tensor(row["singular_values"], dtype=torch.float64), ref["sigma"][:shown], rtol=1e-10, atol=1e-12
    )
    assert row["effective_rank"] == pytest.approx(ref["erank"], rel=1e-8)
    assert row["rank_above_1pct"] == ref["above"]


def save_lora(folder: Path, multiplicative: bool = False) -> tuple[Path, dict]:
    """A PEFT LoRA folder (down_proj with its own alpha by alpha_pattern) and its dense s·B·A per module."""
    g = torch.Generator().manual_seed(5)
    tensors, dense = {}, {}
    for layer in (0, 2):
        for path, (out, inp) in MODULES.items():
            A, B = torch.randn(LORA_R, inp, generator=g) * 0.1, torch.randn(out, LORA_R, generator=g) * 0.1
            tensors[lora_key(layer, path, "A")], tensors[lora_key(layer, path, "B")] = A, B
            alpha = DOWN_ALPHA if path == "mlp.down_proj" else LORA_ALPHA
            dense[f"model.layers.{layer}.{path}"] = alpha / LORA_R * B.double() @ A.double()
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": LORA_R,
        "lora_alpha": LORA_ALPHA,
        "alpha_pattern": {"down_proj": DOWN_ALPHA},
        "target_modules": ["q_proj", "down_proj", "up_proj"],
    }
    if multiplicative:
        config["multiplicative"] = True
    save_adapter(folder, tensors, config)
    return folder, dense


# ---------------------------------------------------------------- Control Adapters
@pytest.mark.parametrize("adapter_type", TYPES)
def test_control_matches_dense_svd(tmp_path, adapter_type):
    folder = save_control(tmp_path / "epoch1", adapter_type)
    states = random_states(adapter_type)
    doc = inspect_json(folder)
    assert doc["kind"] == "control" and doc["adapter_type"] == adapter_type and doc["top"] == 8
    k = 2 * RANK if adapter_type in ("symmetrise", "antisymmetrise") else RANK
    assert doc["factor_rank"] == k and doc["hidden_size"] == 64
    assert [row["layer"] for row in doc["rows"]] == LAYERS
    dense = {layer: dense_w(states[layer], adapter_type, SCALE) for layer in LAYERS}
    for row in doc["rows"]:
        assert row["rank"] == k and row["shape"] == [64, 64]
        check_row(row, dense[row["layer"]])
    s = doc["summary"]
    largest = max(LAYERS, key=lambda i: torch.linalg.matrix_norm(dense[i]))
    assert s["rows"] == s["layers"] == len(LAYERS) and s["largest_frobenius"]["at"] == f"layer {largest}"
    total = math.sqrt(sum(float(torch.linalg.matrix_norm(W)) ** 2 for W in dense.values()))
    assert s["total_frobenius"] == pytest.approx(total, rel=1e-10)

    # The table: a header naming both effective ranks, one row per layer, one summary line.
    result = run(folder)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert "erank = exp(H(p))" in lines[1] and "0.01·σ_max" in lines[1]
    assert [line.split()[0] for line in lines[3:-1]] == [str(i) for i in LAYERS]
    assert len(lines) == 3 + len(LAYERS) + 1
    assert lines[-1].startswith(f"summary: {len(LAYERS)} layers; largest ‖W'‖_F") and f"at layer {largest}" in lines[-1]


def test_top_k(tmp_path):
    folder = save_control(tmp_path / "epoch1", "symmetrise")
    states = random_states("symmetrise")
    doc = inspect_json(folder, "--top", 3)
    for row in doc["rows"]:
        check_row(row, dense_w(states[row["layer"]], "symmetrise", SCALE), top=3)
    # More than the factors hold: all 2r of them.
    assert all(len(row["singular_values"]) == 2 * RANK for row in inspect_json(folder, "--top", 100)["rows"])


def test_checkpoint_and_qlora_pipe_lite_folders(tmp_path):
    save_control(tmp_path / "ckpt" / "adapter", "full")
    legacy = save_control(tmp_path / "legacy", "full", cap_keys=False)
    for folder in (tmp_path / "ckpt", legacy):
        doc = inspect_json(folder)
        assert doc["adapter_type"] == "full" and [r["layer"] for r in doc["rows"]] == LAYERS
        for row in doc["rows"]:
            check_row(row, dense_w(random_states("full")[row["layer"]], "full", SCALE))


def test_untrained_adapter_is_all_zero(tmp_path):
    states = random_states("full")
    for state in states.values():
        state["B"].zero_()
    config = {"peft_type": "LORA", "r": RANK, "lora_alpha": ALPHA, "target_modules": []}
    config.update(control_adapter_type="full", control_adapter_target="writers")
    folder = save_adapter(tmp_path / "zero", control_tensors(states), config)
    for row in inspect_json(folder)["rows"]:
        assert row["frobenius"] == row["spectral"] == row["effective_rank"] == 0.0
        assert row["rank_above_1pct"] == 0 and row["singular_values"] == [0.0] * RANK


# ---------------------------------------------------------------- LoRA
@pytest.mark.parametrize("multiplicative", [False, True])
def test_lora_matches_dense_svd(tmp_path, multiplicative):
    folder, dense = save_lora(tmp_path / "lora", multiplicative)
    doc = inspect_json(folder)
    assert doc["kind"] == "lora" and doc["multiplicative"] is multiplicative and doc["rank"] == LORA_R
    assert [row["name"] for row in doc["rows"]] == sorted(dense, key=lambda n: (int(n.split(".")[2]), n))
    for row in doc["rows"]:
        assert row["shape"] == list(dense[row["name"]].shape) and row["layer"] == int(row["name"].split(".")[2])
        check_row(row, dense[row["name"]])
    assert doc["summary"]["rows"] == 6 and doc["summary"]["layers"] == 2

    result = run(folder)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("multiplicative" if multiplicative else "additive") and "ΔW = s·B·A" in lines[0]
    assert len(lines) == 3 + 6 + 1 and lines[-1].startswith("summary: 6 modules on 2 layers")


# ---------------------------------------------------------------- --plot
def test_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    folder = save_control(tmp_path / "epoch1", "spectral")
    png = tmp_path / "norms.png"
    result = run(folder, "--plot", png)
    assert result.exit_code == 0, result.output
    assert f"plot → {png}" in result.stdout
    data = png.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000
    # With --json too, and for a LoRA; an existing picture is replaced; no temporaries are left.
    lora, _ = save_lora(tmp_path / "lora")
    doc = inspect_json(lora, "--plot", png)
    assert doc["plot"] == str(png) and png.read_bytes() != data and len(png.read_bytes()) > 10_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch1", "lora", "norms.png"]


# ---------------------------------------------------------------- bad input
def _one_error_line(result, *words):
    assert result.exit_code == 2, result.output
    assert result.stdout == "", result.stdout
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cap-export: error:"), result.output
    for word in words:
        assert word in lines[0], lines[0]


def test_bad_inputs_are_one_line(tmp_path, monkeypatch):
    good = save_control(tmp_path / "good", "full")
    png = tmp_path / "out.png"
    _one_error_line(run(tmp_path / "missing"), "not found")
    _one_error_line(run(good / "adapter_model.safetensors"), "not a folder")
    (tmp_path / "empty").mkdir()
    _one_error_line(run(tmp_path / "empty"), "adapter_config.json")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "adapter_config.json").write_text("{}")
    _one_error_line(run(tmp_path / "half"), "adapter_model.safetensors")
    corrupt = tmp_path / "corrupt"
    shutil.copytree(good, corrupt)
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    _one_error_line(run(corrupt, "--plot", png), "safetensors")
    nan = save_control(tmp_path / "nan", "full")
    state = random_states("full")
    state[LAYERS[0]]["A"][0, 0] = float("nan")
    save_adapter(nan, control_tensors(state), json.loads((nan / "adapter_config.json").read_text()))
    _one_error_line(run(nan, "--plot", png), "NaN")
    _one_error_line(run(good, "--top", 0), "--top 0")
    _one_error_line(run(good, "--plot", tmp_path), "is a folder")
    _one_error_line(run(good, "--plot", good / "adapter_config.json"), "adapter's own files")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    _one_error_line(run(good, "--plot", png), "matplotlib")
    assert not png.exists()
    assert sorted(p.name for p in good.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
