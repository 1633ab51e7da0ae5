"""Layer-wise loading: sharded checkpoints, reading only a stage's tensors, one-line errors for broken
folders, and peak host memory of about one layer."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cap_common.config import config_from_dict
from cap_common.errors import CapError
from cap_common.models import ModelSpec, build_pipeline_layers, loading
from tests import assets

REPO = Path(__file__).resolve().parents[1]


def make_spec(folder: Path, tmp_path: Path, **keys) -> ModelSpec:
    raw = dict(
        model_dir=str(folder),
        lr=1e-4,
        sequence_len=16,
        output_dir=str(tmp_path / "out"),
        lora_rank=4,
        use_control_adapters=True,
        model_dtype="float32",
        datasets=[{"dataset_path": "x"}],
        **keys,
    )
    return ModelSpec.from_config(config_from_dict(raw, tmp_path / "cfg.toml"))


def run(layers, ids):
    x = (ids, torch.ones_like(ids, dtype=torch.int8))
    for layer in layers:
        x = layer(x)
    return x


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture
def read_log(monkeypatch):
    """Names of the tensors read from checkpoints during the test."""
    names = []
    original = loading.Checkpoint.read

    def read(self, name, what=""):
        names.append(name)
        return original(self, name, what)

    monkeypatch.setattr(loading.Checkpoint, "read", read)
    return names


# ---------------------------------------------------------------- sharded checkpoints
@pytest.mark.parametrize("family", ["llama", "cohere"])  # separate and tied LM head
def test_sharded_stage_reads_only_its_tensors(family, tiny_model_dir, tmp_path, read_log):
    import transformers

    single = tiny_model_dir(family)
    sharded = tmp_path / "sharded"
    model = transformers.AutoModelForCausalLM.from_pretrained(single, dtype=torch.float32)
    model.save_pretrained(sharded, max_shard_size="100KB")
    shutil.copy(single / "config.json", sharded / "config.json")
    index = json.loads((sharded / loading.INDEX).read_text())
    assert len(set(index["weight_map"].values())) > 2

    spec = make_spec(sharded, tmp_path, pipeline_stages=2)
    ids = torch.randint(0, assets.VOCAB_SIZE, (1, 12))
    with torch.no_grad():
        stage1 = build_pipeline_layers(spec, stage=1)
        stage1_reads = list(read_log)
        stage0 = build_pipeline_layers(spec, stage=0)
        got = run(stage0 + stage1, ids)
        want = run(build_pipeline_layers(make_spec(single, tmp_path)), ids)
    head = "model.embed_tokens.weight" if family == "cohere" else "lm_head.weight"
    assert {n.split(".")[2] for n in stage1_reads if n.startswith("model.layers.")} == {"2", "3"}
    assert {n for n in stage1_reads if not n.startswith("model.layers.")} == {"model.norm.weight", head}
    assert torch.equal(got, want)


# ---------------------------------------------------------------- broken folders
def rewrite(folder: Path, change) -> None:
    tensors = load_file(folder / "model.safetensors")
    change(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def one_line_error(spec, stage=None) -> str:
    with pytest.raises(CapError) as e:
        build_pipeline_layers(spec, stage=stage)
    message = str(e.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def test_missing_tensor_names_file_and_tensor(tiny_model_dir, tmp_path):
    folder = copy_model(tiny_model_dir("llama"), tmp_path / "m")
    rewrite(folder, lambda t: t.pop("model.layers.2.mlp.down_proj.weight"))
    spec = make_spec(folder, tmp_path, pipeline_stages=2)
    build_pipeline_layers(spec, stage=0)  # layers 0-1 are intact
    message = one_line_error(spec, stage=1)
    assert str(folder / "model.safetensors") in message
    assert "'model.layers.2.mlp.down_proj.weight' is missing" in message


def test_missing_mixtral_expert_names_the_checkpoint_tensor(tiny_model_dir, tmp_path):
    folder = copy_model(tiny_model_dir("mixtral"), tmp_path / "m")
    rewrite(folder, lambda t: t.pop("model.layers.0.block_sparse_moe.experts.1.w2.weight"))
    message = one_line_error(make_spec(folder, tmp_path))
    assert "'model.layers.0.block_sparse_moe.experts.1.w2.weight' is missing" in message


def test_wrong_shape_names_file_tensor_and_shapes(tiny_model_dir, tmp_path):
    folder = copy_model(tiny_model_dir("qwen2"), tmp_path / "m")
    rewrite(folder, lambda t: t.update({"model.layers.1.self_attn.q_proj.weight": torch.zeros(64, 32)}))
    message = one_line_error(make_spec(folder, tmp_path))
    assert str(folder / "model.safetensors") in message
    assert "'model.layers.1.self_attn.q_proj.weight' has shape [64, 32], expected [64, 64]" in message


def test_quantized_hub_checkpoints_say_how_to_dequantize(tmp_path):
    """gpt-oss's MXFP4 experts (…_blocks, …_scales) and DeepSeek's fp8 weights (…weight_scale_inv) are
    one line each naming the tensor and how to get a checkpoint cap loads."""
    oss = copy_model(assets.tiny_model("gpt_oss", tmp_path / "oss0"), tmp_path / "oss")
    key = "model.layers.0.mlp.experts.gate_up_proj"

    def mxfp4(t):
        w = t.pop(key)
        t[key + "_blocks"], t[key + "_scales"] = w.to(torch.uint8), w[..., :1].to(torch.uint8)

    rewrite(oss, mxfp4)
    message = one_line_error(make_spec(oss, tmp_path))
    assert f"tensor '{key}' is MXFP4-quantized" in message and "Mxfp4Config(dequantize=True)" in message

    ds = copy_model(assets.tiny_model("deepseek_v3", tmp_path / "ds0"), tmp_path / "ds")
    key = "model.layers.0.mlp.down_proj.weight"
    rewrite(ds, lambda t: t.update({key + "_scale_inv": torch.ones(1, 1)}))
    message = one_line_error(make_spec(ds, tmp_path))
    assert f"tensor '{key}' is fp8 with block scales" in message and str(ds / "model.safetensors") in message


def test_missing_shard_and_missing_checkpoint(tiny_model_dir, tmp_path):
    folder = copy_model(tiny_model_dir("llama"), tmp_path / "m")
    names = list(load_file(folder / "model.safetensors"))
    (folder / loading.INDEX).write_text(
        json.dumps({"weight_map": dict.fromkeys(names, "model-00001-of-00002.safetensors")})
    )
    (folder / "model.safetensors").unlink()
    message = one_line_error(make_spec(folder, tmp_path))
    assert "model-00001-of-00002.safetensors" in message and "does not exist" in message
    (folder / loading.INDEX).unlink()
    assert "no model.safetensors or model.safetensors.index.json" in one_line_error(make_spec(folder, tmp_path))


# ---------------------------------------------------------------- peak host memory
PROBE = textwrap.dedent("""
    import json, sys, torch
    from pathlib import Path
    from cap_common.config import config_from_dict
    from cap_common.models import ModelSpec, load_stage, open_model

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    folder = Path(sys.argv[1])
    cfg = config_from_dict(dict(model_dir=str(folder), lr=1e-4, sequence_len=16, output_dir=str(folder / "out"),
                                lora_rank=4, use_control_adapters=True, model_dtype="float32",
                                datasets=[{"dataset_path": "x"}]),
                           folder / "cfg.toml")
    spec = ModelSpec.from_config(cfg)
    source = open_model(folder)
    positions = range(source.num_layers + 2)
    load_stage(spec, [positions[-1]], "meta")  # imports and code paths: fixed overhead
    result = {}
    for device in ("meta", "cpu"):
        before = status("VmRSS:")
        open("/proc/self/clear_refs", "w").write("5")   # reset the high-water mark to now
        layers = load_stage(spec, positions, device)
        result[device] = {"before": before, "peak": status("VmHWM:"), "after": status("VmRSS:")}
    print(json.dumps(result))
""")


def peak_rss(folder: Path) -> dict:
    """{device: {before, peak, after}} bytes of RSS around loading the whole model to meta, then cpu."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(folder)], capture_output=True, text=True, env=env, cwd=REPO, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS reset")
def test_layer_wise_load_keeps_peak_rss_near_one_layer(tmp_path):
    folder = assets.tiny_model(
        "llama",
        tmp_path / "big",
        hidden_size=1024,
        intermediate_size=4096,
        num_attention_heads=8,
        num_key_value_heads=8,
        num_hidden_layers=4,
    )
    tensors = load_file(folder / "model.safetensors")
    layer_bytes = sum(t.nbytes for n, t in tensors.items() if n.startswith("model.layers.0."))
    model_bytes = sum(t.nbytes for t in tensors.values())
    del tensors
    mb = 2**20
    overhead = 40 * mb  # allocator slack, a tensor's copy in flight, Python objects
    rss = peak_rss(folder)
    off, on = rss["meta"], rss["cpu"]
    print(
        f"\nlayer {layer_bytes / mb:.0f} MB, model {model_bytes / mb:.0f} MB; "
        f"to meta: peak +{(off['peak'] - off['before']) / mb:.0f} MB; "
        f"to cpu: peak +{(on['peak'] - on['before']) / mb:.0f} MB, resident +{(on['after'] - on['before']) / mb:.0f} MB"
    )
    # Layers moved off the host (meta stands in for a GPU): the host holds about one layer at a time.
    assert off["peak"] - off["before"] < 2 * layer_bytes + overhead
    # Layers kept on the host: the model itself plus about one layer in flight, never two copies.
    assert on["peak"] - on["after"] < layer_bytes + overhead


def test_full_fine_tune_of_tied_model_over_stages_is_refused(tiny_model_dir, tmp_path):
    raw = dict(full_fine_tune=True, pipeline_stages=2)
    cfg = config_from_dict(
        dict(
            model_dir=str(tiny_model_dir("cohere")),
            lr=1e-4,
            sequence_len=16,
            output_dir=str(tmp_path / "out"),
            datasets=[{"dataset_path": "x"}],
            **raw,
        ),
        tmp_path / "cfg.toml",
    )
    assert "tied embeddings" in one_line_error(ModelSpec.from_config(cfg), stage=0)


@pytest.mark.parametrize("bias", [False, True])
def test_4bit_linear_trains_the_same_after_an_eval_forward(bias):
    """A 4-bit linear computes x·deq(W)ᵀ + b, and its input gradient ∂L/∂y·deq(W), in training mode,
    in eval mode without grad, and in training again after that eval (bitsandbytes' own forward
    repacked the weight at the eval for a kernel without autograd: the next backward got no gradient).
    deq(W) is bitsandbytes' own nf4 round trip of the weight; the reference is plain torch on it."""
    import bitsandbytes.functional as bnbf

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(64, 96, bias=bias)).to(torch.bfloat16)
    weight, b = module[0].weight.detach().clone(), None if not bias else module[0].bias.detach().clone()
    q, state = bnbf.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
    deq = bnbf.dequantize_4bit(q, state)
    assert loading.quantize_4bit(module) == ["0"]
    module = module.to("cpu")
    module[0].support_avx512bf16_for_cpu = True  # bitsandbytes' repacking condition, on any CPU
    x = torch.randn(3, 5, 64, dtype=torch.bfloat16)

    def reference():
        xr = x.clone().requires_grad_(True)
        y = xr @ deq.T + (0 if b is None else b)
        y.float().square().sum().backward()
        return y.detach(), xr.grad

    def trained():
        module.train()
        xc = x.clone().requires_grad_(True)
        y = module(xc)
        y.float().square().sum().backward()
        return y.detach(), xc.grad

    want_y, want_grad = reference()
    for when in ("before an eval", "after an eval"):
        y, grad = trained()
        assert grad is not None, when
        torch.testing.assert_close(y, want_y, rtol=0, atol=0, msg=when)
        torch.testing.assert_close(grad, want_grad, rtol=0, atol=0, msg=when)
        module.eval()
        with torch.inference_mode():
            torch.testing.assert_close(module(x), want_y, rtol=0, atol=0)
