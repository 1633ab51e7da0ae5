"""What qlora-pipe-lite users already have, through cap-export's CLI: its Control Adapter folders in
every layout either generation wrote (Oct 2025 spectral Q/S and Aug 2025 A/B; pickled .bin or
.safetensors; with and without control_adapter_type; its Aug 2025 run TOML), converted and checked
against the independent float64 reference `dense_w`; the multiplicative LoRA made without a base
model, merged into every family; its LoRAs (additive and Aug 2025 multiplicative); GGUF outtypes
read back and dequantized; its command lines answered with cap's form; every bad input one line."""

from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from cap_common.adapters.io import lora_key
from cap_export.base import Base
from cap_export.cli import main
from tests import assets
from tests.test_export_gguf import LLAMA_CPP, base_shapes, llama_cpp_rows, lora_on_all_linears, read
from tests.test_export_models import peft_logits
from tests.test_export_support import (  # noqa: F401
    LAYERS,
    RANK,
    dense_w,
    random_states,
    reference_logits,
    save_control,
    single_thread,
    token_ids,
)

ERA_A_ALPHA = 2.0  # round(√r) for r = 4: qlora-pipe-lite's Aug 2025 default lora_alpha
ALL_FAMILIES = (*assets.FAMILIES, *assets.MORE_FAMILIES)
# MoE families whose experts (or routed and shared experts) write the residual stream in every adapted layer
# besides o_proj and down_proj: a multiplicative LoRA made without a base model does not fit them.
REFUSED_WITHOUT_BASE = {"qwen3_moe", "glm4_moe", "deepseek_v3", "granitemoe", "gpt_oss"}


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def ok(result):
    assert result.exit_code == 0, result.output
    return result


def one_error_line(result, *words) -> str:
    """Exit code 2 and exactly one `cap-export: error:` line (the only output line), holding every word."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("cap-export: error:")]
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output and "Usage:" not in result.output, result.output
    for word in words:
        assert str(word) in lines[0], lines[0]
    return lines[0]


def nothing_written(tmp_path: Path, out: Path) -> None:
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


# ---------------------------------------------------------------- qlora-pipe-lite's folders
def peer_key(layer: int, name: str, prefix: str = "base_model.model.") -> str:
    """Its saved names (spec section 10): control_Q / control_S bare, control_A / control_B with .weight."""
    suffix = f"control_{name}.weight" if name in ("A", "B") else f"control_{name}"
    return f"{prefix}model.layers.{layer}.{suffix}"


def peer_config(rank: int, alpha: float, layers, adapter_type: str | None = None) -> dict:
    """adapter_config.json as PEFT's LoraConfig.save_pretrained writes it for qlora-pipe-lite."""
    config = {
        "alpha_pattern": {},
        "auto_mapping": None,
        "base_model_name_or_path": None,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layer_replication": None,
        "layers_pattern": None,
        "layers_to_transform": list(layers),
        "loftq_config": {},
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": rank,
        "rank_pattern": {},
        "revision": None,
        "target_modules": [],
        "task_type": "CAUSAL_LM",
        "use_dora": False,
        "use_rslora": False,
    }
    if adapter_type:
        config["control_adapter_type"] = adapter_type
    return config


def save_peer(
    folder: Path,
    adapter_type: str,
    fmt: str = "bin",
    with_type: bool = False,
    seed: int = 0,
    prefix: str = "base_model.model.",
    dtype=torch.float32,
    hidden: int = 64,
    q_noise: float = 0.0,
) -> tuple[Path, dict, float]:
    """A qlora-pipe-lite epoch folder: spectral = its Oct 2025 Q/S adapter (alpha = r), the A/B types
    its Aug 2025 one (alpha = round(√r)). q_noise: Gaussian noise of that size added to spectral Q,
    which qlora-pipe-lite trains as it is (a penalty only pulls it towards orthonormal). Returns
    (folder, states as stored, scale alpha/r)."""
    states = random_states(adapter_type, seed, hidden=hidden)
    g = torch.Generator().manual_seed(seed)
    for state in states.values():
        if "Q" in state and q_noise:
            state["Q"] = state["Q"] + q_noise * torch.randn(state["Q"].shape, generator=g)
    states = {layer: {n: t.to(dtype).contiguous() for n, t in state.items()} for layer, state in states.items()}
    alpha = float(RANK) if adapter_type == "spectral" else ERA_A_ALPHA
    tensors = {peer_key(layer, n, prefix): t for layer, state in states.items() for n, t in state.items()}
    folder.mkdir(parents=True)
    if fmt == "bin":
        torch.save(tensors, folder / "adapter_model.bin")
    else:
        save_file(tensors, folder / "adapter_model.safetensors")
    config = peer_config(RANK, alpha, LAYERS, adapter_type if with_type else None)
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return folder, states, alpha / RANK


def lora_pairs(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v.double() for k, v in load_file(folder / "adapter_model.safetensors").items()}


def base_weight(model_dir: Path, name: str) -> torch.Tensor:
    with safe_open(model_dir / "model.safetensors", framework="pt") as f:
        return f.get_tensor(name).double()


def check_conversions(tmp_path: Path, ckpt: Path, states: dict, adapter_type: str, scale: float, model: Path) -> None:
    """multiplicative (no base) and additive, forward and --inverse (and --exact-inverse), against dense_w."""
    trained_inverse = "inverse" if adapter_type == "spectral" else "negate"
    for flags, direction in (((), "forward"), (("--inverse",), trained_inverse), (("--exact-inverse",), "inverse")):
        name = "-".join(f.strip("-") for f in flags) or "fwd"
        mult, add = tmp_path / f"mult-{name}", tmp_path / f"add-{name}"
        ok(run("multiplicative", ckpt, mult, *flags))
        ok(run("additive", model, ckpt, add, *flags))
        assert json.loads((mult / "cap_export.json").read_text())["control_adapter_type"] == adapter_type
        m, a = lora_pairs(mult), lora_pairs(add)
        for layer in LAYERS:
            D = dense_w(states[layer], adapter_type, scale, direction)
            for path in ("self_attn.o_proj", "mlp.down_proj"):
                A, B = m[lora_key(layer, path, "A")], m[lora_key(layer, path, "B")]
                torch.testing.assert_close(B @ A, D, atol=2e-6, rtol=1e-5)
                M = base_weight(model, f"model.layers.{layer}.{path}.weight")
                A, B = a[lora_key(layer, path, "A")], a[lora_key(layer, path, "B")]
                torch.testing.assert_close(B @ A, D @ M, atol=2e-6, rtol=1e-5)


LAYOUTS = [
    (adapter_type, fmt, with_type)
    for adapter_type in ("spectral", "full")
    for fmt in ("bin", "safetensors")
    for with_type in (False, True)
] + [("symmetrise", "bin", True), ("antisymmetrise", "safetensors", True)]


@pytest.mark.parametrize("adapter_type,fmt,with_type", LAYOUTS)
def test_peer_layouts_convert_exactly(tmp_path, tiny_model_dir, adapter_type, fmt, with_type):
    ckpt, states, scale = save_peer(tmp_path / "epoch1", adapter_type, fmt, with_type)
    check_conversions(tmp_path, ckpt, states, adapter_type, scale, tiny_model_dir("llama"))


@pytest.mark.parametrize("adapter_type", ["spectral", "full"])
def test_peer_bfloat16_and_bare_keys(tmp_path, tiny_model_dir, adapter_type):
    """lora_weight_dtype = bfloat16, and keys without the base_model.model. prefix."""
    ckpt, states, scale = save_peer(tmp_path / "epoch2", adapter_type, "bin", prefix="", dtype=torch.bfloat16)
    check_conversions(tmp_path, ckpt, states, adapter_type, scale, tiny_model_dir("llama"))


@pytest.mark.parametrize("adapter_type", ["symmetrise", "antisymmetrise"])
def test_era_a_type_from_the_run_toml(tmp_path, tiny_model_dir, adapter_type):
    """Aug 2025: PEFT dropped control_adapter_type from adapter_config.json; the training TOML that
    qlora-pipe-lite copied into the run folder (the epoch folder's parent) still has it."""
    run_dir = tmp_path / "20250830_12-00-00"
    ckpt, states, scale = save_peer(run_dir / "epoch1", adapter_type, "bin")
    (run_dir / "config.toml").write_text(
        f'model_dir = "/models/x"\noutput_dir = "/runs"\nuse_control_adapters = true\n'
        f'lora_rank = {RANK}\ncontrol_adapter_type = "{adapter_type}"\n'
    )
    r = ok(run("multiplicative", ckpt, tmp_path / "m"))
    assert f"control_adapter_type '{adapter_type}' from {run_dir / 'config.toml'}" in r.output, r.output
    check_conversions(tmp_path / "all", ckpt, states, adapter_type, scale, tiny_model_dir("llama"))
    # without the TOML the same folder is an ordinary full adapter
    (run_dir / "config.toml").unlink()
    ok(run("multiplicative", ckpt, tmp_path / "plain"))
    assert json.loads((tmp_path / "plain" / "cap_export.json").read_text())["control_adapter_type"] == "full"


def test_safetensors_preferred_over_bin(tmp_path, tiny_model_dir):
    ckpt, states, scale = save_peer(tmp_path / "epoch1", "spectral", "safetensors")
    other = random_states("spectral", seed=7)
    torch.save(
        {peer_key(layer, n): t for layer, state in other.items() for n, t in state.items()},
        ckpt / "adapter_model.bin",
    )
    ok(run("multiplicative", ckpt, tmp_path / "m"))
    m = lora_pairs(tmp_path / "m")
    A, B = m[lora_key(1, "mlp.down_proj", "A")], m[lora_key(1, "mlp.down_proj", "B")]
    torch.testing.assert_close(B @ A, dense_w(states[1], "spectral", scale), atol=2e-6, rtol=1e-5)
    # and a checkpoint folder holding adapter/adapter_model.bin is found too
    (tmp_path / "step10" / "adapter").mkdir(parents=True)
    for name in ("adapter_model.bin", "adapter_config.json"):
        (tmp_path / "step10" / "adapter" / name).write_bytes((ckpt / name).read_bytes())
    ok(run("additive", tiny_model_dir("llama"), tmp_path / "step10", tmp_path / "a"))


class Evil:
    """A pickle that would run a command when unpickled without weights_only."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


class Opaque:
    pass


def test_bad_bin_files_are_one_line(tmp_path, tiny_model_dir):
    llama = tiny_model_dir("llama")
    out = tmp_path / "out"
    good, _, _ = save_peer(tmp_path / "good", "full", "bin")
    tensors = torch.load(good / "adapter_model.bin", weights_only=True)

    def variant(name: str, content) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "adapter_config.json").write_bytes((good / "adapter_config.json").read_bytes())
        if isinstance(content, bytes):
            (folder / "adapter_model.bin").write_bytes(content)
        else:
            torch.save(content, folder / "adapter_model.bin")
        return folder

    marker = tmp_path / "ran"
    cases = [
        (variant("evil", {**tensors, "x": Evil(marker)}), ("needs the Python object", "weights-only")),
        (variant("globals", {**tensors, "x": Opaque()}), ("Opaque", "weights-only")),
        (variant("number", {**tensors, "step": 3}), ("'step' is int, not a tensor", "names → tensors")),
        (variant("list", list(tensors.values())), ("holds a list",)),
        (variant("nested", {"state_dict": tensors}), ("'state_dict' is dict",)),
        (variant("corrupt", b"\x80\x04garbage"), ("not a readable PyTorch state dict",)),
        (variant("empty", b""), ("not a readable PyTorch state dict", "ends early")),
        (variant("truncated", (good / "adapter_model.bin").read_bytes()[:300]), ("adapter_model.bin",)),
    ]
    mixed = dict(tensors)
    mixed.update({peer_key(1, "Q"): torch.zeros(64, RANK), peer_key(1, "S"): torch.zeros(RANK)})
    cases.append((variant("mixed", mixed), ("both control_A / control_B and control_Q / control_S",)))
    for folder, words in cases:
        for args in (("additive", llama, folder, out), ("multiplicative", folder, out), ("merge", llama, folder, out)):
            one_error_line(run(*args), folder / "adapter_model.bin", *words)
            nothing_written(tmp_path, out)
    assert not marker.exists()  # nothing in the pickle ran


# ---------------------------------------------------------------- qlora-pipe-lite's LoRAs
def test_peer_loras_merge(tmp_path, tiny_model_dir):
    """Its PEFT LoRA as adapter_model.bin (additive), and the Aug 2025 multiplicative tool's output
    (no marker; A [k, H] on the writers' output, alpha = k) with merge --multiplicative."""
    model = tiny_model_dir("llama")
    shapes = base_shapes(model)
    g = torch.Generator().manual_seed(3)
    additive, multiplicative = {}, {}
    for layer in LAYERS:
        for path in ("self_attn.q_proj", "mlp.down_proj"):
            out, inp = shapes[f"model.layers.{layer}.{path}.weight"]
            additive[lora_key(layer, path, "A")] = torch.randn(RANK, inp, generator=g) * 0.1
            additive[lora_key(layer, path, "B")] = torch.randn(out, RANK, generator=g) * 0.1
        for path in ("self_attn.o_proj", "mlp.down_proj"):
            multiplicative[lora_key(layer, path, "A")] = torch.randn(RANK, 64, generator=g) * 0.1
            multiplicative[lora_key(layer, path, "B")] = torch.randn(64, RANK, generator=g) * 0.1
    for name, tensors, alpha, targets in (
        ("add", additive, 8.0, ["down_proj", "q_proj"]),
        ("mult", multiplicative, float(RANK), ["down_proj", "o_proj"]),
    ):
        (tmp_path / name).mkdir()
        torch.save(tensors, tmp_path / name / "adapter_model.bin")
        config = {"peft_type": "LORA", "r": RANK, "lora_alpha": alpha, "target_modules": targets}
        (tmp_path / name / "adapter_config.json").write_text(json.dumps(config))
    ok(run("merge", model, tmp_path / "add", tmp_path / "m_add"))
    r = run("merge", model, tmp_path / "mult", tmp_path / "bad")
    one_error_line(r, "it looks multiplicative: pass --multiplicative")
    nothing_written(tmp_path, tmp_path / "bad")
    ok(run("merge", model, tmp_path / "mult", tmp_path / "m_mult", "--multiplicative"))
    for name, tensors, s, mult in (("m_add", additive, 8.0 / RANK, False), ("m_mult", multiplicative, 1.0, True)):
        merged = load_file(tmp_path / name / "model.safetensors")
        base = load_file(model / "model.safetensors")
        touched = {key.split(".lora_")[0].removeprefix("base_model.model.") + ".weight" for key in tensors}
        for key, W in base.items():
            if key not in touched:
                assert torch.equal(merged[key], W), key
                continue
            module = "base_model.model." + key.removesuffix(".weight")
            A, B = (tensors[f"{module}.lora_{x}.weight"].double() for x in "AB")
            M = W.double()
            want = M + s * B @ (A @ M) if mult else M + s * B @ A
            torch.testing.assert_close(merged[key].double(), want, atol=1e-6, rtol=1e-6)


def test_gguf_refuses_multiplicative_loras(tmp_path, tiny_model_dir):
    """A multiplicative LoRA, marked (cap-export multiplicative) or as qlora-pipe-lite's Aug 2025 tool
    wrote it (no marker; lora_A [k, H] on the writers' output, which for down_proj [H, I] is not the
    [k, I] an additive pair needs): llama.cpp only adds B·A, so gguf refuses it in one line naming the
    folder and the two ways out, and writes nothing."""
    model = tiny_model_dir("llama")
    ok(run("multiplicative", save_control(tmp_path / "ckpt", "full"), tmp_path / "marked"))
    g = torch.Generator().manual_seed(4)
    peer = {
        lora_key(layer, path, part): torch.randn(*shape, generator=g) * 0.1
        for layer in LAYERS
        for path in ("self_attn.o_proj", "mlp.down_proj")
        for part, shape in (("A", (RANK, 64)), ("B", (64, RANK)))
    }
    (tmp_path / "peer").mkdir()
    torch.save(peer, tmp_path / "peer" / "adapter_model.bin")
    config = {"peft_type": "LORA", "r": RANK, "lora_alpha": float(RANK), "target_modules": ["down_proj", "o_proj"]}
    (tmp_path / "peer" / "adapter_config.json").write_text(json.dumps(config))
    out = tmp_path / "a.gguf"
    for lora in (tmp_path / "peer", tmp_path / "marked"):
        r = run("gguf", lora, out, "--base", model)
        one_error_line(r, lora, "multiplicative", "cap-export additive BASE CKPT OUT", "merge", "--multiplicative")
        nothing_written(tmp_path, out)


def test_verify_uses_spectral_q_as_stored(tmp_path, tiny_model_dir):
    """A spectral adapter whose Q is ≈ 0.1 from orthonormal (‖QᵀQ − I‖_F): training used it as stored,
    W'₊ = Q·diag(eˢ − 1)·Qᵀ, and so does the export (checked against the float64 reference); verify's
    trained side must too, and then finds the export exact. Cohere: a parallel block, where the block
    adapter's writers form is exact."""
    model = tiny_model_dir("cohere")
    ckpt, states, _ = save_peer(tmp_path / "epoch1", "spectral", q_noise=0.02)
    for state in states.values():
        Q = state["Q"].double()
        assert 0.05 < float(torch.linalg.norm(Q.T @ Q - torch.eye(RANK, dtype=torch.float64))) < 0.2
    ids = token_ids()
    for direction, flags in (("forward", ()), ("inverse", ("--inverse",))):  # classes +1 and −1
        lora = tmp_path / direction
        ok(run("additive", model, ckpt, lora, *flags))
        want = reference_logits(model, "cohere", states, "spectral", "block", ids, direction)
        torch.testing.assert_close(peft_logits(model, "cohere", lora, ids), want, atol=1e-4, rtol=0)
        r = run("verify", model, lora)
        gap = float(re.search(r"max \|Δlogit\| = ([0-9.e+-]+)", r.output).group(1))
        assert r.exit_code == 0 and gap <= 1e-4 and "OK" in r.output, r.output


# ---------------------------------------------------------------- multiplicative without a base → any family
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_multiplicative_without_base_merges_into_every_family(tmp_path, tiny_model_dir, family):
    model = tiny_model_dir(family)
    ckpt, states, scale = save_peer(tmp_path / "epoch1", "spectral", "bin")
    experts = ("--mixtral", 4) if family == "mixtral" else ()
    ok(run("multiplicative", ckpt, tmp_path / "mult", *experts))
    record = json.loads((tmp_path / "mult" / "cap_export.json").read_text())
    assert record["model_type"] is None and record["hidden_size"] == 64
    if family in REFUSED_WITHOUT_BASE:  # one line naming what the LoRA is for, nothing written
        one_error_line(run("merge", model, tmp_path / "mult", tmp_path / "merged"), "this LoRA is for", model)
        assert not (tmp_path / "merged").exists()
        return
    base_model = Base(model, need_weights=False)
    writers = [name.split(".", 3)[3].removesuffix(".weight") for name in base_model.writer_names(LAYERS[0])]
    assert all(base_model.writer_names(layer)[-1].endswith(writers[-1] + ".weight") for layer in LAYERS)
    assert record["modules"] == writers
    r = ok(run("merge", model, tmp_path / "mult", tmp_path / "merged"))
    assert "multiplicative" in r.output
    merged, base = load_file(tmp_path / "merged" / "model.safetensors"), load_file(model / "model.safetensors")
    touched = 0
    for key, W in base.items():
        parts = key.split(".")
        layer = int(parts[2]) if key.startswith("model.layers.") else None
        if layer not in LAYERS or ".".join(parts[3:]).removesuffix(".weight") not in writers:
            assert torch.equal(merged[key], W), key
            continue
        D = dense_w(states[layer], "spectral", scale)
        M = W.double()
        torch.testing.assert_close(merged[key].double(), M + D @ M, atol=1e-6, rtol=1e-6)  # (I + W')·M
        touched += 1
    assert touched == len(LAYERS) * len(writers)


def test_multiplicative_without_base_refuses_only_what_does_not_fit(tmp_path, tiny_model_dir):
    mixtral, llama = tiny_model_dir("mixtral"), tiny_model_dir("llama")
    ckpt, _, _ = save_peer(tmp_path / "epoch1", "full", "bin")
    ok(run("multiplicative", ckpt, tmp_path / "plain"))
    out = tmp_path / "out"
    line = one_error_line(run("merge", mixtral, tmp_path / "plain", out), "mlp.down_proj", "--mixtral 4")
    assert "cap_export.json" in line
    nothing_written(tmp_path, out)
    ok(run("multiplicative", ckpt, tmp_path / "two", "--mixtral", 2))
    one_error_line(run("merge", mixtral, tmp_path / "two", out), "experts.2.w2", "unchanged")
    nothing_written(tmp_path, out)
    one_error_line(run("merge", llama, tmp_path / "two", out), "experts.0.w2")
    nothing_written(tmp_path, out)
    wide, _, _ = save_peer(tmp_path / "wide", "full", "bin", hidden=96)
    ok(run("multiplicative", wide, tmp_path / "m96"))
    one_error_line(run("merge", llama, tmp_path / "m96", out), "hidden size 96", "hidden_size 64")
    nothing_written(tmp_path, out)
    deep = save_control(tmp_path / "deep", "full", layers=[1, 6])
    ok(run("multiplicative", deep, tmp_path / "m_deep"))
    one_error_line(run("merge", llama, tmp_path / "m_deep", out), "layer 6", "4 layers")
    nothing_written(tmp_path, out)
    # an additive LoRA made for one family is still refused for another
    ok(run("additive", llama, ckpt, tmp_path / "add"))
    one_error_line(run("merge", tiny_model_dir("cohere"), tmp_path / "add", out), "made for a llama model")
    nothing_written(tmp_path, out)


# ---------------------------------------------------------------- GGUF outtypes
def dequantized(tensor) -> torch.Tensor:
    """A GGUFReader tensor as float64 in numpy (row-major) order, through gguf's own dequantize."""
    data = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type)
    return torch.from_numpy(np.array(data, dtype=np.float64)).reshape(list(reversed(tensor.shape.tolist())))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("outtype", ["f32", "F16", "bf16", "Q8_0"])
def test_gguf_outtypes_read_back(tmp_path, tiny_model_dir, family, outtype):
    model = tiny_model_dir(family)
    pairs = lora_on_all_linears(tmp_path / "lora", model)
    out = tmp_path / "a.gguf"
    r = ok(run("gguf", tmp_path / "lora", out, "--base", model, "--outtype", outtype))
    kind = outtype.lower()
    assert ("stored as f16" in r.output) == (kind == "q8_0"), r.output
    _, tensors = read(out)
    config = __import__("transformers").AutoConfig.from_pretrained(model)
    Q = gguf.GGMLQuantizationType
    for (layer, path), (A, B) in pairs.items():
        heads = {"self_attn.q_proj": config.num_attention_heads, "self_attn.k_proj": config.num_key_value_heads}
        if family == "llama" and path in heads:
            B = llama_cpp_rows(B, heads[path])
        for ab, want in (("a", A.double()), ("b", B.double())):
            t = tensors[f"blk.{layer}.{LLAMA_CPP[path]}.weight.lora_{ab}"]
            got = dequantized(t)
            assert got.shape == want.shape
            if kind == "q8_0":
                # lora_a rows (64 or 128 values) pack into 32-value blocks; lora_b rows (r = 4) cannot: f16
                assert t.tensor_type == (Q.Q8_0 if ab == "a" else Q.F16)
            else:
                assert t.tensor_type == {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16}[kind]
            if t.tensor_type == Q.F32:
                torch.testing.assert_close(got, want, atol=0, rtol=0)
            elif t.tensor_type == Q.F16:
                torch.testing.assert_close(got, want, atol=1e-4, rtol=2**-11)
            elif t.tensor_type == Q.BF16:
                torch.testing.assert_close(got, want, atol=0, rtol=2**-8)
            else:  # Q8_0, per block of 32: d = max|x|/127 stored in f16 (relative error ≤ 2⁻¹¹), q = round(x/d)
                blocks = want.reshape(want.shape[0], -1, 32)
                step = blocks.abs().amax(-1, keepdim=True) / 127
                err = (got.reshape(blocks.shape) - blocks).abs()
                assert bool((err <= step * (0.5 + 127 * 2**-11) + 1e-12).all()), float((err / step).max())
                assert float(err.max()) > 0  # really quantized


def test_gguf_bad_outtype_is_refused(tmp_path, tiny_model_dir):
    model = tiny_model_dir("qwen2")
    lora_on_all_linears(tmp_path / "lora", model)
    r = run("gguf", tmp_path / "lora", tmp_path / "a.gguf", "--base", model, "--outtype", "q4_0")
    assert r.exit_code == 2 and "q4_0" in r.output and not (tmp_path / "a.gguf").exists()


# ---------------------------------------------------------------- qlora-pipe-lite's command lines
PEER_LINES = [
    # (its command line, cap's form it must show), with {B} base, {C} adapter, {L} LoRA, {O} output
    ("control_adapter_to_lora.py --base {B} --adapter {C} --output {O} --no-gpu", "cap-export additive {B} {C} {O}"),
    (
        "control_adapter_to_lora --base {B} --adapter {C} --output {O} --inverse --cohere",
        "cap-export additive {B} {C} {O} --inverse",
    ),
    ("control_adapter_to_additive_lora.py {B} {C} {O} --rank 4 --no-gpu", "cap-export additive {B} {C} {O} --rank 4"),
    ("control_adapter_to_multiplicative_lora.py {C} {O} --rank 4", "cap-export multiplicative {C} {O}"),
    (
        "tools/merge_lora.py --input {B} --adapter {L} --output {O} --scale 0.5",
        "cap-export merge {B} {L} {O} --scale 0.5",
    ),
    ("merge_lora.py {B} {L} {O} --inverse", "cap-export merge {B} {L} {O} --scale -1"),
    ("lora_to_gguf.py --input {L} --output {O} --arch llama --outtype Q8_0", "cap-export gguf {L} {O} --outtype Q8_0"),
    ("additive --base {B} --adapter {C} --output {O}", "cap-export additive {B} {C} {O}"),
    ("additive {B} {C} {O} --no-gpu", "cap-export additive {B} {C} {O}"),
    ("multiplicative --input {C} --output {O}", "cap-export multiplicative {C} {O}"),
    ("merge --input {B} --adapter {L} --output {O}", "cap-export merge {B} {L} {O}"),
    ("merge {L} {O} --base {B}", "cap-export merge {B} {L} {O}"),
    ("gguf --input {L} --output {O} --arch llama", "cap-export gguf {L} {O} --base BASE"),
    ("verify --base {B} --adapter {C}", "cap-export verify {B} {C}"),
    ("analyze_control_adapters.py --adapter {C} --no-gpu", "cap-export inspect {C}"),
    ("convert_ds_checkpoint.py --input ckpt --config run.toml --output {O}", "cap-export additive BASE epochN {O}"),
]


@pytest.mark.parametrize("line,form", PEER_LINES)
def test_peer_command_lines_get_caps_form(tmp_path, tiny_model_dir, line, form):
    names = {"B": str(tiny_model_dir("llama")), "C": str(tmp_path / "ckpt"), "L": str(tmp_path / "lora")}
    names["O"] = str(tmp_path / "out")
    save_control(Path(names["C"]), "full")
    lora_on_all_linears(Path(names["L"]), Path(names["B"]))
    args = [word.format(**names) for word in shlex.split(line)]
    error = one_error_line(run(*args), "qlora-pipe-lite", "cap's" if "convert_ds" not in line else "epoch<N>/")
    shown = shlex.join(shlex.split(form.format(**names)))  # quoted as the message quotes it
    assert f"`{shown}" in error, error
    nothing_written(tmp_path, Path(names["O"]))
    if form.startswith("cap-export ") and "BASE" not in form and "inspect" not in form:
        if " gguf " in form:
            return
        ok(run(*shlex.split(shown)[1:]))  # and cap's form does the job


def test_convert_ds_checkpoint_names_the_epoch_folder_and_its_output(tmp_path):
    """Its --output is where the adapter goes (cap's OUT); the adapter cap reads is the run's epoch<N>/ folder."""
    run_dir = tmp_path / "out" / "20251001_12-00-00"
    for folder in ("global_step40", "epoch1", "epoch2"):
        (run_dir / folder).mkdir(parents=True)
    args = ["--input", run_dir / "global_step40", "--config", "run.toml", "--output", tmp_path / "lora"]
    error = one_error_line(run("convert_ds_checkpoint.py", *args), "qlora-pipe-lite", "epoch<N>/")
    assert f"`cap-export additive BASE {run_dir / 'epoch2'} {tmp_path / 'lora'}`" in error, error
    nothing_written(tmp_path, tmp_path / "lora")


def test_caps_own_options_are_not_intercepted(tmp_path, tiny_model_dir):
    model = tiny_model_dir("llama")
    ckpt = save_control(tmp_path / "ckpt", "full")
    ok(run("multiplicative", ckpt, tmp_path / "m", "--base", model, "--mixtral", 4))
    ok(run("additive", model, ckpt, tmp_path / "a", "--cohere", "--inverse", "--rank", 2))
    lora_on_all_linears(tmp_path / "lora", model)
    ok(run("gguf", tmp_path / "lora", tmp_path / "a.gguf", "--base", model, "--outtype", "BF16"))
    r = run("additive", model, ckpt, tmp_path / "x", "--bogus")
    assert r.exit_code == 2 and "No such option" in r.output  # click's own answer for other typos


def test_the_family_list_is_complete():
    """test_multiplicative_without_base_merges_into_every_family covers every family cap knows."""
    from cap_common.models import FAMILIES

    assert set(ALL_FAMILIES) == set(FAMILIES)
