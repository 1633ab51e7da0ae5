"""cap_train/profile.py: ops sorted into the categories a step's time is reported in, a real
profile summed without double counting, and CAP_PROFILE refused in one line when malformed.
(A profiled cap-train run: tests/test_train.py::test_control_adapter_training_one_vs_two_stages.)"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from cap_train.profile import category, summarize
from tests.test_train import ENV, write_config


@pytest.mark.parametrize(
    "name, shapes, expected",
    [
        ("aten::mm", [[4096, 4096], [4096, 4096]], "matmul"),
        ("aten::mm", [[4096, 4096], [4096, 16]], "adapter matmul"),  # x·Aᵀ
        ("aten::mm", [[16, 4096], [4096, 14336]], "adapter matmul"),  # ∂A = gᵀ·x
        ("aten::addmm", [[64], [64, 64], [64, 64]], "matmul"),  # small, but no dimension 4x below another
        ("aten::mm", None, "matmul"),
        ("aten::_scaled_dot_product_flash_attention", None, "attention"),
        ("aten::_efficient_attention_backward", None, "attention"),
        ("bitsandbytes::dequantize_4bit", None, "dequantize"),
        ("cap::loss", None, "loss"),
        ("autograd::engine::evaluate_function: _FusedLinearCEBackward", None, "loss"),
        ("aten::_foreach_addcdiv_", None, "optimizer"),
        ("nccl:all_reduce", None, "communication"),
        ("aten::copy_", None, "copies and casts"),
        ("aten::mul", [[4096, 4096], []], "elementwise, norms, rotary, activations"),
    ],
)
def test_category(name, shapes, expected):
    assert category(name, shapes) == expected


def test_summarize_a_cpu_step():
    """Categories partition the ops' self times: their sum is the total of the profiler's own table."""
    torch.manual_seed(0)
    x = torch.randn(256, 512)
    w = torch.nn.Parameter(torch.randn(512, 512) / 20)
    a = torch.nn.Parameter(torch.randn(8, 512) / 20)
    opt = torch.optim.AdamW([w, a], foreach=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        h = x @ w.T + (x @ a.T) @ a
        q = h.view(1, 4, 64, 512)
        h = torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True).view(256, 512)
        torch.nn.functional.cross_entropy(h, torch.randint(0, 512, (256,))).backward()
        opt.step()
    out = summarize(prof, 1.0, torch.device("cpu"))
    cats = out["categories"]
    assert {"matmul", "adapter matmul", "attention", "loss", "optimizer"} <= set(cats), cats
    assert sum(cats.values()) == pytest.approx(out["busy_ms"])
    total = sum(e.self_cpu_time_total for e in prof.key_averages()) / 1000
    assert out["busy_ms"] == pytest.approx(total, rel=1e-6)


@pytest.mark.parametrize("value", ["0", "2.5:out.json"])
def test_bad_cap_profile_is_one_line(tmp_path, tiny_model_dir, value):
    cfg = write_config(tmp_path, tiny_model_dir("llama"))
    run = subprocess.run(
        [sys.executable, "-m", "cap_train.cli", str(cfg)],
        env={**ENV, "CAP_PROFILE": value},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2, run.stderr[-2000:]
    lines = run.stderr.strip().splitlines()
    assert lines[-1] == (
        f"cap-train: error: CAP_PROFILE={value}: expected STEP or STEP:FILE, STEP an optimizer step (1, 2, ...)"
    ), run.stderr[-2000:]
    assert not (tmp_path / "out").exists()
