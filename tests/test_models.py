"""Pipeline layers of every family against independent references: transformers (zero adapters,
padding, sliding windows, 1 and 2 stages), float64 math (control adapters, block and writers),
PEFT (LoRA) and dequantized weights (QLoRA)."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
import transformers

from cap_common.adapters.control import orthonormal
from cap_common.adapters.factors import spectral_factors
from cap_common.adapters.lora import LoraLinear
from cap_common.config import config_from_dict
from cap_common.models import (
    FAMILIES,
    DecoderLayerPipe,
    EmbeddingPipe,
    LmHeadPipe,
    ModelSpec,
    build_pipeline_layers,
    labels_and_classes,
    layer_specs,
    stage_parts,
)
from tests import assets

FAMILY_NAMES = list(assets.FAMILIES) + list(assets.MORE_FAMILIES)
PAD = 2  # a token id; padding is recognized by class 0, not by id
T = 20  # longer than the tiny sliding windows (8)
TRANSFORMED = [1, 2]

# The residual writers, as the reference sees them (weights [out=H, in]): those of these a layer has.
WRITER_WEIGHTS = (
    "self_attn.o_proj.weight",
    "mlp.down_proj.weight",
    "mlp.experts.down_proj",
    "mlp.shared_experts.down_proj.weight",
    "block_sparse_moe.experts.down_proj",
)
# GPT-OSS keeps its experts' down projections as [E, in, out=H] (x @ W), the others as [E, out=H, in].
OUTPUT_LAST = {"gpt_oss": ("mlp.experts.down_proj",)}


def map_writers(layer, family: str, M: torch.Tensor) -> None:
    """In place: every writer weight of `layer` replaced by M·W (M [H, H] on its output); biases (GPT-OSS's
    o_proj and experts) stay, as the writers target defines it."""
    for name in writer_weights(layer):
        w = layer.get_parameter(name)
        last = name in OUTPUT_LAST.get(family, ())
        w.copy_(torch.einsum("hk,...ik->...ih", M, w) if last else torch.einsum("hk,...ki->...hi", M, w))


def writer_weights(hf_layer) -> list[str]:
    names = [n for n in WRITER_WEIGHTS if any(n == k for k, _ in hf_layer.named_parameters())]
    assert names[0] == "self_attn.o_proj.weight" and len(names) >= 2, names
    return names


# ---------------------------------------------------------------- fixtures and helpers
@pytest.fixture(scope="session")
def model_dir(tiny_model_dir, tmp_path_factory):
    """model_dir(family): the shared tiny model, or for a family not in assets.FAMILIES one made here."""
    cache = {}

    def make(family):
        if family in assets.FAMILIES:
            return tiny_model_dir(family)
        if family not in cache:
            cache[family] = assets.tiny_model(family, tmp_path_factory.mktemp(family))
        return cache[family]

    return make


_HF = {}


def hf_model(folder: Path, family: str, dtype=torch.float32):
    key = (str(folder), dtype)
    if key not in _HF:
        _HF[key] = transformers.AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, attn_implementation=FAMILIES[family].attention
        ).eval()
    return _HF[key]


def float64_copy(model):
    """A float64 copy of an HF model (MoE experts on the eager loop: grouped_mm has no float64)."""
    model = copy.deepcopy(model).double()
    model.config._experts_implementation = "eager"
    return model


def make_cfg(folder: Path, tmp_path: Path, **keys):
    raw = dict(
        model_dir=str(folder),
        lr=1e-4,
        sequence_len=T,
        output_dir=str(tmp_path / "out"),
        lora_rank=4,
        model_dtype="float32",
        datasets=[{"dataset_path": "x"}],
    )
    return config_from_dict({**raw, **keys}, tmp_path / "cfg.toml")


def make_spec(folder: Path, tmp_path: Path, **keys) -> ModelSpec:
    """The model of a config with these keys (model_dtype float32 unless given)."""
    return ModelSpec.from_config(make_cfg(folder, tmp_path, **keys))


def run(layers, input_ids, control_class):
    x = (input_ids, control_class)
    for layer in layers:
        x = layer(x)
    return x


def batch(seed=0, pad_from=14, classes=(1, -1)):
    """Two sequences of T tokens; the second ends in padding (class 0) from `pad_from` on."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, assets.VOCAB_SIZE, (2, T), generator=g)
    cc = torch.tensor(classes, dtype=torch.int8)[torch.randint(0, len(classes), (2, T), generator=g)]
    ids[1, pad_from:] = PAD
    cc[1, pad_from:] = 0
    return ids, cc


def randomize_adapters(layers, scale=0.3):
    """Non-zero adapters, the same for a layer whichever stage built it (seeded by layer index)."""
    for m in layers:
        if isinstance(m, DecoderLayerPipe) and m.adapter is not None:
            g = torch.Generator().manual_seed(100 + m.index)
            a = m.adapter
            with torch.no_grad():
                if a.adapter_type == "spectral":
                    a.S.copy_(torch.randn(a.S.shape, generator=g))
                else:
                    a.B.copy_(scale * torch.randn(a.B.shape, generator=g))


def class_weights(adapter):
    """Dense float64 W' for class +1 and −1: spectral uses the exact inverse, the others −W'."""
    plus = adapter.weight(torch.float64)
    if adapter.adapter_type == "spectral":
        U, V = spectral_factors(orthonormal(adapter.Q.detach().double()), adapter.S.detach().double(), -1)
        return plus, U @ V
    return plus, -plus


def adapters_by_layer(layers):
    return {m.index: m.adapter for m in layers if isinstance(m, DecoderLayerPipe) and m.adapter is not None}


# ---------------------------------------------------------------- small pieces
def test_labels_and_classes_shift_by_one():
    ids = torch.tensor([[10, 11, 12, 13, 14]], dtype=torch.int32)  # as cap-prep's shards hold them
    cc = torch.tensor([[0, 1, -1, 0, 1]], dtype=torch.int8)
    labels, classes = labels_and_classes(ids, cc)
    assert classes.tolist() == [[1, -1, 0, 1, 0]]
    assert classes.dtype == torch.int8 and labels.dtype == torch.long
    assert labels.tolist() == [[11, 12, -100, 14, -100]]


@pytest.mark.parametrize("n_layers,stages", [(4, 1), (4, 2), (5, 2), (30, 4), (3, 3)])
def test_stage_parts_are_contiguous_and_balanced(n_layers, stages):
    parts = stage_parts(n_layers, stages)
    assert parts[0] == 0 and parts[-1] == n_layers + 2 and parts == sorted(parts)
    decoders = [len(set(range(parts[s], parts[s + 1])) & set(range(1, n_layers + 1))) for s in range(stages)]
    assert max(decoders) - min(decoders) <= 1 and sum(decoders) == n_layers


def test_unsupported_model_type_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt2", "num_hidden_layers": 2}')
    from cap_common.errors import CapError

    with pytest.raises(CapError) as e:
        build_pipeline_layers(make_spec(tmp_path, tmp_path))
    msg = str(e.value)
    assert "'gpt2' is not supported" in msg and "llama" in msg and "gemma2" in msg and "\n" not in msg


@pytest.mark.parametrize(
    "model_type, why",
    [("qwen3_next", "a Gated DeltaNet hybrid"), ("llama4_text", "chunked attention"), ("lfm2", "hybrid")],
)
def test_a_family_not_trained_yet_is_one_line_saying_why(tmp_path, model_type, why):
    from cap_common.errors import CapError
    from cap_common.models.families import check_model_type

    with pytest.raises(CapError) as e:
        check_model_type({"model_type": model_type}, "m/config.json")
    msg = str(e.value)
    assert msg.startswith(f"m/config.json: model_type '{model_type}' is not supported (") and why in msg
    assert "supported model_types: llama" in msg and "deepseek_v3" in msg and "\n" not in msg


# ---------------------------------------------------------------- parity with transformers
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_zero_adapters_match_transformers(family, model_dir, tmp_path):
    """Adapters at init (zero) change nothing: logits equal HF's on every non-pad position, padded
    batch, T beyond the sliding window, whole model and two separately built stages."""
    folder = model_dir(family)
    ids, cc = batch(pad_from=14)
    real = torch.ones(2, T, dtype=torch.bool)
    real[1, 14:] = False
    with torch.no_grad():
        ref = hf_model(folder, family)(ids, attention_mask=real.long()).logits
        one = run(build_pipeline_layers(make_spec(folder, tmp_path, use_control_adapters=True)), ids, cc)
        spec2 = make_spec(
            folder, tmp_path, use_control_adapters=True, pipeline_stages=2, control_adapter_target="writers"
        )
        stage0 = build_pipeline_layers(spec2, stage=0)
        stage1 = build_pipeline_layers(spec2, stage=1)
        assert isinstance(stage0[0], EmbeddingPipe) and isinstance(stage1[-1], LmHeadPipe)
        assert len(stage0) + len(stage1) == 6
        two = run(stage0 + stage1, ids, cc)
        later = ids.clone()
        later[:, 10] = (later[:, 10] + 1) % assets.VOCAB_SIZE
        changed = run(stage0 + stage1, later, cc)
    # Causal: a later token changes nothing before it (up to MoE grouped-matmul rounding).
    assert (changed[:, :10] - two[:, :10]).abs().max() <= 1e-6 < (changed[:, 10:] - two[:, 10:]).abs().max()
    assert (one[real] - ref[real]).abs().max() <= 1e-5
    assert (two[real] - ref[real]).abs().max() <= 1e-5


# Every family with the default type; the other types (spectral: exact inverse for class −1) on a few.
ADAPTER_CASES = [(f, "full") for f in FAMILY_NAMES] + [
    ("llama", "spectral"),
    ("mixtral", "symmetrise"),
    ("gemma2", "spectral"),
    ("cohere", "antisymmetrise"),
]


def test_qwen2_sliding_layers_match_transformers(tmp_path):
    """Qwen2 with use_sliding_window: sliding layers from max_window_layers on (config.layer_types)."""
    folder = assets.tiny_model("qwen2", tmp_path / "m", use_sliding_window=True, sliding_window=8, max_window_layers=2)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
    assert hf.config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    ids, cc = batch(pad_from=T)
    with torch.no_grad():
        got = run(build_pipeline_layers(make_spec(folder, tmp_path, use_control_adapters=True)), ids, cc)
        assert (got - hf(ids).logits).abs().max() <= 1e-5
        hf.config.layer_types = ["full_attention"] * 4  # the windows matter at this length
        assert (got - hf(ids).logits).abs().max() > 1e-3


@pytest.mark.parametrize("family,adapter_type", ADAPTER_CASES)
def test_control_block_matches_float64_reference(family, adapter_type, model_dir, tmp_path):
    """y' = h + Δ + c·W'_c·Δ on layers_to_transform, checked against HF layers run in float64 with
    the adapter added by a forward hook; class 0 positions (padding) are untouched."""
    folder = model_dir(family)
    spec = make_spec(
        folder, tmp_path, use_control_adapters=True, control_adapter_type=adapter_type, layers_to_transform=TRANSFORMED
    )
    layers = build_pipeline_layers(spec)
    randomize_adapters(layers)
    adapters = adapters_by_layer(layers)
    assert sorted(adapters) == TRANSFORMED
    ids, cc = batch(seed=1)
    _, classes = labels_and_classes(ids, cc)

    hf64 = float64_copy(hf_model(folder, family))
    hooks = []
    for i, adapter in adapters.items():
        plus, minus = class_weights(adapter)

        def hook(module, args, output, plus=plus, minus=minus):
            delta = output - args[0]
            c = classes[..., None].double()
            return output + torch.where(c > 0, delta @ plus.T, torch.where(c < 0, delta @ minus.T, 0 * delta))

        hooks.append(hf64.model.layers[i].register_forward_hook(hook))
    with torch.no_grad():
        ref = hf64(ids).logits
        for h in hooks:
            h.remove()
        base = hf64(ids).logits
        got = run(layers, ids, cc)
    assert (ref - base).abs().max() > 1e-2, "the adapters should change the logits"
    assert (got.double() - ref).abs().max() <= 1e-4
    with torch.no_grad():  # class 0 everywhere: the base model
        assert (run(layers, ids, torch.zeros_like(cc)).double() - base).abs().max() <= 1e-4


@pytest.mark.parametrize("family,adapter_type", ADAPTER_CASES)
def test_control_writers_equal_replaced_writer_weights(family, adapter_type, model_dir, tmp_path):
    """Target "writers": for tokens all of class c, the same as HF with each writer weight M of the
    transformed layers replaced by (I + c·W'_c)·M, biases kept (float64, dense)."""
    folder = model_dir(family)
    spec = make_spec(
        folder,
        tmp_path,
        use_control_adapters=True,
        control_adapter_type=adapter_type,
        control_adapter_target="writers",
        layers_to_transform=TRANSFORMED,
    )
    layers = build_pipeline_layers(spec)
    randomize_adapters(layers)
    adapters = adapters_by_layer(layers)
    ids, _ = batch(seed=2)
    base = hf_model(folder, family)
    with torch.no_grad():
        base_logits = base(ids).logits.double()
    for c in (1, -1, 0):
        hf64 = float64_copy(base)
        with torch.no_grad():
            for i, adapter in adapters.items():
                plus, minus = class_weights(adapter)
                M = torch.eye(plus.shape[0], dtype=torch.float64) + (plus if c > 0 else minus if c < 0 else 0 * plus)
                map_writers(hf64.model.layers[i], family, M)
            ref = hf64(ids).logits
            got = run(layers, ids, torch.full(ids.shape, c, dtype=torch.int8))
        # The last position predicts nothing (class 0) and no other position sees it.
        assert (got[:, :-1].double() - ref[:, :-1]).abs().max() <= 1e-4, f"class {c}"
        assert ((ref - base_logits).abs().max() > 1e-3) == (c != 0), "the adapters act on classes ±1 only"


@pytest.mark.parametrize("target", ["block", "writers"])
def test_control_gradients_reach_only_the_adapters(target, model_dir, tmp_path):
    spec = make_spec(model_dir("mixtral"), tmp_path, use_control_adapters=True, control_adapter_target=target)
    layers = build_pipeline_layers(spec)
    randomize_adapters(layers)
    ids, cc = batch()
    run(layers, ids, cc).square().mean().backward()
    named = [(n, p) for m in layers for n, p in m.named_parameters()]
    trainable = [n for n, p in named if p.requires_grad]
    assert trainable and all(n.startswith("adapter.") for n in trainable)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in named if p.requires_grad)


# ---------------------------------------------------------------- LoRA / QLoRA / full
def peft_reference(folder, family, layers, dequantize=False, dtype=torch.float32):
    """HF + PEFT with the pipeline's LoRA factors (and, for QLoRA, its dequantized base weights)."""
    import bitsandbytes as bnb
    import peft

    hf = copy.deepcopy(hf_model(folder, family, dtype))
    if dequantize:  # Experts4bit runs transformers' eager experts loop; grouped_mm rounds differently in bf16
        hf.config._experts_implementation = "eager"
    pairs = {}
    for m in layers:
        if not isinstance(m, DecoderLayerPipe):
            continue
        for name, mod in m.layer.named_modules():
            if isinstance(mod, LoraLinear):
                pairs[f"model.layers.{m.index}.{name}"] = mod
            if dequantize and isinstance(mod, bnb.nn.Linear4bit):
                w = bnb.functional.dequantize_4bit(mod.weight.data, mod.weight.quant_state)
                name = name.removesuffix(".base_layer")
                expert = re.fullmatch(r"(.*)\.(gate_up|down)\.(\d+)", name)  # Experts4bit → fused 3-D weights
                hf_layer = hf.model.layers[m.index]
                with torch.no_grad():
                    if expert:
                        hf_layer.get_parameter(f"{expert[1]}.{expert[2]}_proj")[int(expert[3])].copy_(w)
                    else:
                        hf_layer.get_submodule(name).weight.copy_(w)
    if family in PEFT_REWRITES_MOE_TARGETS:
        return hooked_lora(hf, pairs)
    any_pair = next(iter(pairs.values()))
    config = peft.LoraConfig(  # exactly cap's modules (PEFT would also wrap fused experts named down_proj)
        r=any_pair.rank,
        lora_alpha=any_pair.alpha,
        target_modules=sorted(pairs),  # full names: PEFT matches them exactly
        lora_dropout=0.0,
    )
    model = peft.get_peft_model(hf, config)
    found = {}
    for name, mod in model.named_modules():
        if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
            key = name.removeprefix("base_model.model.")
            if key not in pairs:  # PEFT's own LoRA on an MoE layer's fused experts, which cap does not add
                assert ".experts" in key, key
                with torch.no_grad():
                    for p in mod.lora_B["default"].parameters():
                        p.zero_()
                continue
            found[key] = mod
            with torch.no_grad():
                mod.lora_A["default"].weight.copy_(pairs[key].lora_A.weight)
                mod.lora_B["default"].weight.copy_(pairs[key].lora_B.weight)
    assert sorted(found) == sorted(pairs)
    return model.eval()


# PEFT 0.21 turns target names such as down_proj into LoRA on these families' fused experts (and then leaves
# a dense layer's own MLP out): for them the reference adds each LoRA pair to its module by a forward hook.
PEFT_REWRITES_MOE_TARGETS = {"qwen3_moe", "glm4_moe", "deepseek_v3"}


def hooked_lora(hf, pairs: dict):
    """hf with y = W·x (+ b) + (α/r)·B·A·x added to each module named in `pairs` (its LoraLinear's factors)."""
    for name, pair in pairs.items():
        A, B, scale = pair.lora_A.weight.detach(), pair.lora_B.weight.detach(), pair.alpha / pair.rank

        def hook(module, args, out, A=A, B=B, scale=scale):
            x = args[0].to(A.dtype)
            return out + (torch.nn.functional.linear(torch.nn.functional.linear(x, A), B) * scale).to(out.dtype)

        hf.get_submodule(name).register_forward_hook(hook)
    return hf.eval()


def randomize_lora(layers):
    g = torch.Generator().manual_seed(7)
    for m in layers:
        for mod in m.modules():
            if isinstance(mod, LoraLinear):
                with torch.no_grad():
                    mod.lora_B.weight.copy_(0.2 * torch.randn(mod.lora_B.weight.shape, generator=g))


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_lora_matches_peft(family, model_dir, tmp_path):
    folder = model_dir(family)
    layers = build_pipeline_layers(make_spec(folder, tmp_path, layers_to_transform=TRANSFORMED))
    randomize_lora(layers)
    for m in layers:
        wrapped = [n for n, mod in m.named_modules() if isinstance(mod, LoraLinear)]
        assert bool(wrapped) == (isinstance(m, DecoderLayerPipe) and m.index in TRANSFORMED)
        if isinstance(m, DecoderLayerPipe) and wrapped:  # every linear of the layer, whatever its kind
            names = [n for n, mod in m.layer.named_modules() if type(mod) is torch.nn.Linear]
            assert [n for n in names if "lora_" not in n and not n.endswith("base_layer")] == [], m.index
    ids, cc = batch()
    with torch.no_grad():
        ref = peft_reference(folder, family, layers)(ids).logits
        got = run(layers, ids, cc)
    assert (got - ref).abs().max() <= 1e-5


@pytest.mark.parametrize(
    "family", ["llama", "mixtral", "cohere", "gemma2", "qwen3_moe", "granitemoe", "gemma3_text", "deepseek_v3"]
)
def test_qlora_matches_dequantized_reference(family, model_dir, tmp_path):
    import bitsandbytes as bnb

    folder = model_dir(family)
    layers = build_pipeline_layers(
        make_spec(folder, tmp_path, load_in_4bit=True, layers_to_transform=TRANSFORMED, model_dtype="bfloat16")
    )
    randomize_lora(layers)
    quantized = [n for m in layers for n, mod in m.named_modules() if isinstance(mod, bnb.nn.Linear4bit)]
    assert len(quantized) >= 4 * 4
    assert not isinstance(layers[0].embed, bnb.nn.Linear4bit) and not isinstance(layers[-1].head, bnb.nn.Linear4bit)
    assert all("gate" not in n or "proj" in n or "gate_up" in n for n in quantized)  # Mixtral's router stays as it is
    if family == "mixtral":  # every expert's projections are 4-bit too
        assert sum(".experts.gate_up." in n or ".experts.down." in n for n in quantized) == 4 * 2 * 4
    ids, cc = batch()
    with torch.no_grad():
        ref = peft_reference(folder, family, layers, dequantize=True, dtype=torch.bfloat16)(ids).logits
        got = run(layers, ids, cc)
        unquantized = peft_reference(folder, family, layers, dtype=torch.bfloat16)(ids).logits
    scale = ref.float().abs().max()
    err = ((got.float() - ref.float()).abs().max() / scale).item()
    assert err <= 0.02, f"relative error {err:.4f}"
    # The reference is not trivially close: the 4-bit rounding itself shows in the logits.
    assert ((unquantized.float() - ref.float()).abs().max() / scale).item() > 0.02


def test_full_fine_tune_trains_everything_in_bf16_and_ties_embeddings(model_dir, tmp_path):
    spec = make_spec(model_dir("cohere"), tmp_path, full_fine_tune=True, model_dtype="bfloat16")
    layers = build_pipeline_layers(spec)
    params = [p for m in layers for p in m.parameters()]
    assert all(p.requires_grad and p.dtype == torch.bfloat16 for p in params)
    assert layers[-1].head.weight is layers[0].embed.weight  # Cohere ties them
    ids, cc = batch()
    run(layers, ids, cc).float().square().mean().backward()
    assert layers[0].embed.weight.grad is not None


# ---------------------------------------------------------------- DeepSpeed specs
def test_layer_specs_are_lazy_and_typed(model_dir, tmp_path, monkeypatch):
    from cap_common.models import loading

    reads = []
    monkeypatch.setattr(
        loading.Checkpoint,
        "read",
        lambda self, name, what="", _read=loading.Checkpoint.read: reads.append(name) or _read(self, name, what),
    )
    specs = layer_specs(make_spec(model_dir("llama"), tmp_path, use_control_adapters=True))
    assert not reads
    assert [s.typename.__name__ for s in specs] == ["EmbeddingPipe"] + ["DecoderLayerPipe"] * 4 + ["LmHeadPipe"]
    layer = specs[3].build()
    assert isinstance(layer, DecoderLayerPipe) and layer.index == 2
    assert reads and all(name.startswith("model.layers.2.") for name in reads)


@pytest.mark.parametrize("family", ["cohere", "gemma2"])  # logit scale; final softcapping
def test_lm_head_hands_the_loss_what_the_logits_are_made_of(family, model_dir, tmp_path):
    seen = {}

    def loss_fn(hidden, weight, labels, classes, logit_scale, softcap):
        logits = logit_scale * hidden @ weight.T
        seen["logits"] = logits if softcap is None else softcap * torch.tanh(logits / softcap)
        seen["labels"], seen["classes"] = labels, classes
        return logits.sum()

    spec = make_spec(model_dir(family), tmp_path, use_control_adapters=True)
    ids, cc = batch()
    with torch.no_grad():
        logits = run(build_pipeline_layers(spec), ids, cc)
        loss = run(build_pipeline_layers(spec, loss_fn=loss_fn), ids, cc)
    assert loss.ndim == 0
    assert (seen["logits"] - logits).abs().max() <= 1e-5
    labels, classes = labels_and_classes(ids, cc)
    assert torch.equal(seen["labels"], labels) and torch.equal(seen["classes"], classes)
