"""cap-export gguf: the file reads back with gguf.GGUFReader with the metadata, tensor names, shapes
and types llama.cpp's adapter loader expects; q/k rows follow llama.cpp's rotary layout (checked
against an index formula written here and against the two RoPE conventions themselves)."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from cap_common.adapters.io import lora_key, save_adapter
from cap_export.cli import main
from tests.test_export_support import save_control, single_thread  # noqa: F401

MODULES = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
# What llama.cpp calls them (its tensor names), independent of gguf's tables.
LLAMA_CPP = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
ARCH = {"llama": "llama", "qwen2": "qwen2", "cohere": "command-r", "gemma2": "gemma2"}
ARCH |= {"gemma3_text": "gemma3", "olmo2": "olmo2", "smollm3": "smollm3", "granite": "granite"}
# Families whose llama.cpp converter derives from its Llama one, which reorders the q/k rows for its rope.
PERMUTED = {"llama", "smollm3", "granite"}
LAYERS = (0, 2)
R = 4


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def base_shapes(model: Path) -> dict[str, list[int]]:
    with safe_open(model / "model.safetensors", "pt") as f:
        return {k: f.get_slice(k).get_shape() for k in f.keys()}


def lora_on_all_linears(folder: Path, model: Path, alpha: float = 8.0, rank_pattern=None) -> dict:
    """A PEFT LoRA (as cap-train's LoRA mode saves it) on every linear of LAYERS; returns its pairs."""
    shapes = base_shapes(model)
    g = torch.Generator().manual_seed(0)
    tensors, pairs = {}, {}
    for layer in LAYERS:
        for path in MODULES:
            out, inp = shapes[f"model.layers.{layer}.{path}.weight"]
            r = (rank_pattern or {}).get(path.rsplit(".", 1)[-1], R)
            A, B = torch.randn(r, inp, generator=g), torch.randn(out, r, generator=g)
            tensors[lora_key(layer, path, "A")], tensors[lora_key(layer, path, "B")] = A, B
            pairs[(layer, path)] = (A, B)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": R,
        "lora_alpha": alpha,
        "target_modules": sorted({p.rsplit(".", 1)[-1] for p in MODULES}),
        "lora_dropout": 0.0,
    }
    if rank_pattern:
        config["rank_pattern"] = rank_pattern
    save_adapter(folder, tensors, config)
    return pairs


def read(path: Path):
    reader = gguf.GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items()}
    tensors = {t.name: t for t in reader.tensors}
    return fields, tensors


def llama_cpp_rows(rows: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF's rotate-half pairs (j, j + D/2) of each head made adjacent (2j, 2j+1), by index."""
    D = rows.shape[0] // n_head
    out = torch.empty_like(rows)
    for h in range(n_head):
        for j in range(D // 2):
            out[h * D + 2 * j] = rows[h * D + j]
            out[h * D + 2 * j + 1] = rows[h * D + D // 2 + j]
    return out


@pytest.mark.parametrize("family", list(ARCH))
def test_gguf_reads_back_as_llama_cpp_expects(tmp_path, tiny_model_dir, family):
    model = tiny_model_dir(family)
    pairs = lora_on_all_linears(tmp_path / "lora", model)
    r = run("gguf", tmp_path / "lora", tmp_path / "a.gguf", "--base", model)
    assert r.exit_code == 0, r.output
    fields, tensors = read(tmp_path / "a.gguf")
    assert fields["general.architecture"] == ARCH[family]
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["adapter.lora.alpha"] == pytest.approx(8.0)
    shapes = base_shapes(model)
    want = {f"blk.{layer}.{LLAMA_CPP[path]}.weight.lora_{ab}" for layer, path in pairs for ab in "ab"}
    assert set(tensors) == want
    config = __import__("transformers").AutoConfig.from_pretrained(model)
    for (layer, path), (A, B) in pairs.items():
        out, inp = shapes[f"model.layers.{layer}.{path}.weight"]
        a = tensors[f"blk.{layer}.{LLAMA_CPP[path]}.weight.lora_a"]
        b = tensors[f"blk.{layer}.{LLAMA_CPP[path]}.weight.lora_b"]
        # GGUF lists dimensions innermost first: the base weight is ne = [in, out]
        assert list(a.shape) == [inp, R] and list(b.shape) == [R, out]
        assert a.tensor_type == b.tensor_type == gguf.GGMLQuantizationType.F32
        torch.testing.assert_close(torch.from_numpy(np.array(a.data)), A, rtol=0, atol=0)
        heads = {"self_attn.q_proj": config.num_attention_heads, "self_attn.k_proj": config.num_key_value_heads}.get(
            path
        )
        want_b = llama_cpp_rows(B, heads) if heads and family in PERMUTED else B
        torch.testing.assert_close(torch.from_numpy(np.array(b.data)), want_b, rtol=0, atol=0)


def test_permuted_rows_turn_rotate_half_into_interleaved_rope(tmp_path, tiny_model_dir):
    """What the permutation is for: RoPE on llama.cpp's rows (adjacent pairs) of the permuted
    delta equals the permuted RoPE on HF's rows (rotate-half pairs) of the original."""
    model = tiny_model_dir("llama")
    pairs = lora_on_all_linears(tmp_path / "lora", model)
    assert run("gguf", tmp_path / "lora", tmp_path / "a.gguf", "--base", model).exit_code == 0
    _, tensors = read(tmp_path / "a.gguf")
    n_head, D = 4, 16
    A, B = pairs[(0, "self_attn.q_proj")]
    b_gguf = torch.from_numpy(np.array(tensors["blk.0.attn_q.weight.lora_b"].data))
    x = torch.randn(64)
    theta = 3.0 * torch.arange(D // 2) / D
    c, s = torch.cos(theta), torch.sin(theta)

    def rope_half(q):  # transformers: pairs (j, j + D/2)
        q = q.reshape(n_head, D)
        lo, hi = q[:, : D // 2], q[:, D // 2 :]
        return torch.cat([lo * c - hi * s, hi * c + lo * s], 1).reshape(-1)

    def rope_adjacent(q):  # llama.cpp's normal mode: pairs (2j, 2j + 1)
        q = q.reshape(n_head, D // 2, 2)
        even, odd = q[..., 0], q[..., 1]
        return torch.stack([even * c - odd * s, odd * c + even * s], -1).reshape(-1)

    torch.testing.assert_close(
        rope_adjacent(b_gguf @ (A @ x)), llama_cpp_rows(rope_half(B @ (A @ x)).unsqueeze(1), n_head).squeeze(1)
    )


def test_gguf_folds_per_module_scaling(tmp_path, tiny_model_dir):
    """llama.cpp scales each pair by α/rank; PEFT by alpha/r per module (rank_pattern): kept equal."""
    model = tiny_model_dir("qwen2")
    pairs = lora_on_all_linears(tmp_path / "lora", model, alpha=8.0, rank_pattern={"down_proj": 2})
    for outtype, tol in (("f32", 1e-5), ("f16", 3e-2)):
        out = tmp_path / f"{outtype}.gguf"
        assert run("gguf", tmp_path / "lora", out, "--base", model, "--outtype", outtype).exit_code == 0
        fields, tensors = read(out)
        alpha = fields["adapter.lora.alpha"]
        for (layer, path), (A, B) in pairs.items():
            a, b = (tensors[f"blk.{layer}.{LLAMA_CPP[path]}.weight.lora_{ab}"] for ab in "ab")
            assert a.tensor_type == b.tensor_type == getattr(gguf.GGMLQuantizationType, outtype.upper())
            a, b = (torch.from_numpy(np.array(t.data)).double() for t in (a, b))
            llama_cpp = alpha / b.shape[1] * b @ a  # what llama.cpp adds to the weight
            peft = 8.0 / A.shape[0] * B.double() @ A.double()  # what PEFT adds
            torch.testing.assert_close(llama_cpp, peft, rtol=tol, atol=tol)


def test_gguf_mixtral_experts_stacked(tmp_path, tiny_model_dir):
    model = tiny_model_dir("mixtral")
    ckpt = save_control(tmp_path / "ckpt", "full")
    assert run("additive", model, ckpt, tmp_path / "lora").exit_code == 0
    assert run("gguf", tmp_path / "lora", tmp_path / "a.gguf", "--base", model).exit_code == 0
    fields, tensors = read(tmp_path / "a.gguf")
    assert fields["general.architecture"] == "llama"
    a, b = tensors["blk.1.ffn_down_exps.weight.lora_a"], tensors["blk.1.ffn_down_exps.weight.lora_b"]
    assert list(a.shape) == [128, R, 4] and list(b.shape) == [R, 64, 4]  # ne of [E, r, I] and [E, H, r]
    assert list(tensors["blk.3.attn_output.weight.lora_a"].shape) == [64, R]


def test_gguf_refuses_multiplicative_and_protects_out(tmp_path, tiny_model_dir):
    model = tiny_model_dir("llama")
    ckpt = save_control(tmp_path / "ckpt", "full")
    assert run("multiplicative", ckpt, tmp_path / "mult").exit_code == 0
    r = run("gguf", tmp_path / "mult", tmp_path / "a.gguf", "--base", model)
    assert r.exit_code == 2 and "multiplicative" in r.output and not (tmp_path / "a.gguf").exists()
    assert run("additive", model, ckpt, tmp_path / "add").exit_code == 0
    (tmp_path / "a.gguf").write_text("old")
    r = run("gguf", tmp_path / "add", tmp_path / "a.gguf", "--base", model)
    assert r.exit_code == 2 and "--force" in r.output and (tmp_path / "a.gguf").read_text() == "old"
    assert run("gguf", tmp_path / "add", tmp_path / "a.gguf", "--base", model, "--force").exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gguf", "add", "ckpt", "mult"]
