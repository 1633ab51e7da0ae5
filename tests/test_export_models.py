"""cap-export against the models themselves: the PEFT-loaded additive LoRA and the merged model
give the logits of the adapter as trained (an independent reference: transformers + hooks with
the dense float64 W'), for every family; multiplicative and additive merges agree; merge keeps the
folder's layout; verify reports exact exports as exact and block adapters' real gap."""

from __future__ import annotations

import json
import re
from pathlib import Path

import peft
import pytest
import torch
import transformers
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file

from cap_common.models import FAMILIES
from cap_export import convert
from cap_export import verify as verifying
from cap_export.adapters import load_control, load_lora
from cap_export.base import Base
from cap_export.cli import main
from cap_export.merge import merge
from cap_export.staging import staged_output
from tests import assets
from tests.test_export_support import hf_model, reference_logits, save_control, single_thread, token_ids  # noqa: F401

TOL = 1e-4

# (family, adapter type, target, direction): every family once, every type and direction on a few.
CASES = [(f, "full", "writers", "forward") for f in assets.FAMILIES] + [
    ("llama", "symmetrise", "writers", "forward"),
    ("llama", "antisymmetrise", "writers", "inverse"),
    ("llama", "full", "writers", "negate"),
    ("qwen3", "spectral", "writers", "inverse"),
    ("mixtral", "spectral", "writers", "inverse"),
    ("gemma2", "symmetrise", "writers", "inverse"),
    ("cohere", "spectral", "block", "inverse"),  # parallel block: block == writers, exactly
    ("cohere2", "full", "block", "forward"),
    # the families since 2025: MoE with a dense layer, sandwich and post-norms, multipliers, per-type rotary
    ("qwen3_moe", "spectral", "writers", "inverse"),
    ("gemma3_text", "full", "writers", "forward"),
    ("olmo3", "symmetrise", "writers", "forward"),
    ("granite", "full", "writers", "negate"),
    ("glm4", "full", "writers", "forward"),
    ("smollm3", "full", "writers", "forward"),
    ("ministral3", "full", "writers", "forward"),
    ("glm4_moe", "full", "writers", "forward"),
    ("deepseek_v3", "antisymmetrise", "writers", "forward"),
]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def additive_folder(tmp_path: Path, model: Path, ckpt: Path, direction: str = "forward", name: str = "lora") -> Path:
    converted = convert.additive(load_control(ckpt), Base(model), direction, progress=False)
    convert.save(converted, tmp_path / name)
    return tmp_path / name


def merged_folder(
    tmp_path: Path, model: Path, lora_dir: Path, multiplicative: bool = False, name: str = "merged"
) -> Path:
    with staged_output(tmp_path / name, False) as tmp:
        merge(Base(model), load_lora(lora_dir), tmp, multiplicative, progress=False)
    return tmp_path / name


@torch.no_grad()
def peft_logits(model_dir: Path, family: str, lora_dir: Path, ids) -> torch.Tensor:
    base = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation=FAMILIES[family].attention
    )
    return peft.PeftModel.from_pretrained(base, lora_dir).eval()(input_ids=ids).logits.float()


@torch.no_grad()
def folder_logits(folder: Path, family: str, ids) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation=FAMILIES[family].attention
    ).eval()
    return model(input_ids=ids).logits.float()


@pytest.mark.parametrize("family,adapter_type,target,direction", CASES)
def test_peft_and_merged_equal_the_trained_adapter(tmp_path, tiny_model_dir, family, adapter_type, target, direction):
    model = tiny_model_dir(family)
    ckpt = save_control(tmp_path / "ckpt", adapter_type, target)
    control = load_control(ckpt)
    ids = token_ids()
    want = reference_logits(model, family, control.states, adapter_type, target, ids, direction)
    base = hf_model(model, family)(input_ids=ids).logits
    assert (want - base).abs().max() > 0.05  # the adapter does something
    lora = additive_folder(tmp_path, model, ckpt, direction)
    if not FAMILIES[family].fused_experts or FAMILIES[family].peft_loads_experts:  # else cap-export says so
        torch.testing.assert_close(peft_logits(model, family, lora, ids), want, atol=TOL, rtol=0)
    torch.testing.assert_close(folder_logits(merged_folder(tmp_path, model, lora), family, ids), want, atol=TOL, rtol=0)


@pytest.mark.parametrize("family", ["llama", "mixtral"])
def test_multiplicative_merge_equals_additive_merge(tmp_path, tiny_model_dir, family):
    model = tiny_model_dir(family)
    ckpt = save_control(tmp_path / "ckpt", "symmetrise")
    additive = merged_folder(tmp_path, model, additive_folder(tmp_path, model, ckpt), name="m_add")
    assert run("multiplicative", ckpt, tmp_path / "mult", "--base", model).exit_code == 0
    # the marker makes merge multiplicative even without --multiplicative
    r = run("merge", model, tmp_path / "mult", tmp_path / "m_mult")
    assert r.exit_code == 0 and "multiplicative LoRA" in r.output
    a, m, b = (load_file(f / "model.safetensors") for f in (additive, tmp_path / "m_mult", model))
    changed = 0
    for key in b:
        torch.testing.assert_close(m[key], a[key], atol=1e-6, rtol=1e-5)
        changed += not torch.equal(a[key], b[key])
    assert changed == 2 * (1 + (4 if family == "mixtral" else 1))  # 2 layers × writers


def _sharded_bf16(folder: Path, family: str) -> Path:
    tokenizer = assets.tiny_tokenizer(folder)
    config = assets.tiny_config(family, tokenizer)
    torch.manual_seed(1)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder, max_shard_size="60KB")
    (folder / "chat_template.jinja").write_text("{{ messages }}")
    return folder


def test_merge_keeps_layout_dtype_and_untouched_bytes(tmp_path):
    model = _sharded_bf16(tmp_path / "base", "cohere")  # tied embeddings
    ckpt = save_control(tmp_path / "ckpt", "full")
    lora = additive_folder(tmp_path, model, ckpt)
    r = run("merge", model, lora, tmp_path / "out", "--scale", 0.5)
    assert r.exit_code == 0, r.output
    out = tmp_path / "out"
    shards = sorted(p.name for p in model.glob("*.safetensors"))
    assert len(shards) > 2 and sorted(p.name for p in out.glob("*.safetensors")) == shards
    index_in = json.loads((model / "model.safetensors.index.json").read_text())
    index_out = json.loads((out / "model.safetensors.index.json").read_text())
    assert index_out["weight_map"] == index_in["weight_map"]
    assert index_out["metadata"]["total_size"] == index_in["metadata"]["total_size"]
    for name in (
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
    ):
        assert (out / name).read_bytes() == (model / name).read_bytes()
    lora_tensors = load_lora(lora)
    touched = {f"{module}.weight" for module in lora_tensors.pairs}
    for shard in shards:
        with safe_open(model / shard, "pt") as f_in, safe_open(out / shard, "pt") as f_out:
            assert list(f_in.keys()) == list(f_out.keys()) and f_in.metadata() == f_out.metadata()
            for key in f_in.keys():
                before, after = f_in.get_tensor(key), f_out.get_tensor(key)
                assert after.dtype == torch.bfloat16
                if key not in touched:
                    assert torch.equal(before, after), key
                    continue
                A, B = (t.double() for t in lora_tensors.pairs[key.removesuffix(".weight")])
                want = (before.double() + 0.5 * B @ A).to(torch.bfloat16)
                assert torch.equal(after, want), key
    assert "model.embed_tokens.weight" in index_in["weight_map"] and "lm_head.weight" not in index_in["weight_map"]


def _verify(*args):
    r = run("verify", *args)
    m = re.search(r"max \|Δlogit\| = ([0-9.e+-]+)", r.output)
    return r, float(m.group(1)) if m else None


def test_verify_exact_and_block_gap(tmp_path, tiny_model_dir):
    llama = tiny_model_dir("llama")
    writers = save_control(tmp_path / "writers", "full", "writers")
    r, gap = _verify(llama, writers)
    assert r.exit_code == 0 and gap < TOL, r.output
    spectral = save_control(tmp_path / "spectral", "spectral", "writers")
    lora = additive_folder(tmp_path, llama, spectral, "inverse", name="inv")
    r, gap = _verify(llama, lora)  # an export alone: its source is in its record
    assert r.exit_code == 0 and "class -1" in r.output and gap < TOL, r.output
    r, gap = _verify(llama, writers, merged_folder(tmp_path, llama, additive_folder(tmp_path, llama, writers)))
    assert r.exit_code == 0 and gap < TOL, r.output
    block = save_control(tmp_path / "block", "full", "block")
    r, gap = _verify(llama, block, "--tolerance", 1e-6)
    assert r.exit_code == 1 and gap > 1e-3 and "MLP reads the attention output" in r.output, r.output
    r, gap = _verify(tiny_model_dir("cohere"), save_control(tmp_path / "cblock", "full", "block"))
    assert r.exit_code == 0 and gap < TOL, r.output
    r, gap = _verify(tiny_model_dir("mixtral"), save_control(tmp_path / "mix", "full", "writers"), "--dtype", "float64")
    assert r.exit_code == 0 and gap < 1e-6, r.output  # float32 LoRA tensors, float64 models


def test_verify_multiplicative_and_full_inverse_note(tmp_path, tiny_model_dir):
    model = tiny_model_dir("qwen2")
    ckpt = save_control(tmp_path / "ckpt", "full")
    assert run("multiplicative", ckpt, tmp_path / "mult", "--base", model).exit_code == 0
    r, gap = _verify(model, ckpt, tmp_path / "mult")
    assert r.exit_code == 0 and gap < TOL and "multiplicative" in r.output, r.output
    r, gap = _verify(model, ckpt, "--exact-inverse", "--tolerance", 1e-6)
    assert r.exit_code == 1 and "differs by O(W'²)" in r.output, r.output
    r, gap = _verify(model, ckpt, "--inverse")
    assert r.exit_code == 0 and gap < TOL, r.output


def test_verify_refuses_an_export_of_another_shape(tmp_path, tiny_model_dir, monkeypatch):
    """EXPORTED made from a model of another hidden size or layer count, as a LoRA or a merged model
    folder: one line naming it, the tensor, its shape and the one BASE has (found from the shapes
    alone, before a model is built), exit code 2."""
    llama = tiny_model_dir("llama")  # hidden 64, intermediate 128, 4 layers, vocab 512
    ckpt = save_control(tmp_path / "ckpt", "full")
    wide = assets.tiny_model("llama", tmp_path / "wide", hidden_size=96)
    deep = assets.tiny_model("llama", tmp_path / "deep", num_hidden_layers=6)
    for name, model, adapter in (
        ("wide", wide, save_control(tmp_path / "c_wide", "full", hidden=96)),
        ("deep", deep, save_control(tmp_path / "c_deep", "full", layers=[1, 5])),
    ):
        assert run("additive", model, adapter, tmp_path / f"lora_{name}").exit_code == 0
        assert run("merge", model, tmp_path / f"lora_{name}", tmp_path / f"merged_{name}").exit_code == 0
    cases = {
        "lora_wide": ("model.layers.1.mlp.down_proj", "lora_A [4, 128] / lora_B [96, 4]", "[64, 128]"),
        "lora_deep": ("model.layers.5.mlp.down_proj", "4 layers"),
        "merged_wide": ("lm_head.weight", "[512, 96]", "[512, 64]"),
        "merged_deep": ("model.layers.4.input_layernorm.weight", "4 layers"),
    }

    def no_model(*args):
        raise AssertionError("verify built its models before checking the shapes")

    monkeypatch.setattr(verifying, "run_verify", no_model)
    for name, words in cases.items():
        r = run("verify", llama, ckpt, tmp_path / name)
        assert r.exit_code == 2 and "Traceback" not in r.output, r.output
        lines = r.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"cap-export: error: {tmp_path / name}"), r.output
        assert all(word in lines[0] for word in words), lines[0]


@pytest.mark.slow
def test_smollm2_additive_merge_verify(tmp_path, smollm2_dir):
    model = smollm2_dir
    ckpt = save_control(tmp_path / "ckpt", "full", "writers", layers=[3, 17, 29], hidden=576, rank=8, alpha=4.0)
    r, gap = _verify(model, ckpt)
    assert r.exit_code == 0 and gap < TOL, r.output
    assert run("additive", model, ckpt, tmp_path / "lora").exit_code == 0
    assert run("merge", model, tmp_path / "lora", tmp_path / "merged").exit_code == 0
    r, gap = _verify(model, tmp_path / "merged", "--tolerance", 10)  # bf16 weights: rounding, reported
    assert r.exit_code == 0 and gap is not None, r.output
    r, gap = _verify(
        model,
        save_control(tmp_path / "block", "full", "block", layers=[3, 17], hidden=576, rank=8, alpha=4.0),
        "--tolerance",
        1e-6,
    )
    assert r.exit_code == 1 and gap > 1e-4, r.output


def test_control_adapter_exports_on_gpt_oss_are_refused_in_one_line(tmp_path, tiny_model_dir):
    """GPT-OSS's experts are stored transposed with biases, which cap-export does not rewrite: one line
    naming the base's config.json, and nothing written."""
    model = tiny_model_dir("gpt_oss")
    ckpt = save_control(tmp_path / "ckpt", "full", "writers", hidden=64)
    for out, args in ((tmp_path / "a", ("additive", model, ckpt)), (tmp_path / "m", ("multiplicative", ckpt))):
        r = run(*args, out, *(("--base", model) if args[0] == "multiplicative" else ()))
        lines = r.output.strip().splitlines()
        assert r.exit_code == 2 and len(lines) == 1, r.output
        assert lines[0].startswith(f"cap-export: error: {model / 'config.json'}: model_type gpt_oss: its experts")
        assert not out.exists()
