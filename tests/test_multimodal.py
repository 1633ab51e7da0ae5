"""Multimodal checkpoints (Gemma 3 4B–27B, Mistral Small 3.x): cap trains their text model. Held to
transformers' own multimodal model called with text alone: the forward, a trained adapter's exports
(PEFT on the multimodal model, through `verify`), and the merge, which keeps every tensor of the
checkpoint (vision tower and projector included) under its own name and dtype."""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from cap_common.models import build_pipeline_layers
from tests import assets
from tests.test_export_models import _verify, run
from tests.test_models import T, batch, make_spec
from tests.test_models import run as run_layers
from tests.test_train import metrics, run_train, write_config

_TOWER = dict(
    hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14
)
VISION = {
    "gemma3": dict(model_type="siglip_vision_model", **_TOWER),
    "mistral3": dict(model_type="pixtral", head_dim=8, **_TOWER),
}
TEXT = {"gemma3": "gemma3_text", "mistral3": "mistral"}
SOFTCAP = {"gemma3": dict(final_logit_softcapping=None)}
CONFIGS = {
    "gemma3": (transformers.Gemma3Config, dict(mm_tokens_per_image=4)),
    "mistral3": (transformers.Mistral3Config, {}),
}


def multimodal_model(folder: Path, model_type: str, v5_names: bool = False) -> Path:
    """A random tiny multimodal model (the tiny text config of tests/assets.py, a one-layer vision tower),
    saved as save_pretrained writes it (`language_model.model.…`), or with transformers v5's module names
    (`model.language_model.…`, `lm_head.weight`); Mistral's LM head untied, as in Mistral Small."""
    tokenizer = assets.tiny_tokenizer(folder)
    # Gemma 3's checkpoints have no final logit softcapping (transformers' multimodal Gemma 3 would ignore it)
    text = assets.tiny_config(TEXT[model_type], tokenizer, **SOFTCAP.get(model_type, {})).to_dict()
    cls, extra = CONFIGS[model_type]
    tied = model_type == "gemma3"
    config = cls(text_config=text, vision_config=VISION[model_type], tie_word_embeddings=tied, **extra)
    torch.manual_seed(0)
    model = transformers.AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    if v5_names:
        path = folder / "model.safetensors"
        tensors = load_file(path)
        renamed = {}
        for k, t in tensors.items():
            k = k.replace("language_model.model.", "model.language_model.").replace(
                "language_model.lm_head.", "lm_head."
            )
            if k.startswith(("vision_tower.", "multi_modal_projector.")):
                k = "model." + k
            renamed[k] = t
        save_file(renamed, path, metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = {}
    for model_type in CONFIGS:
        for v5 in (False, True):
            out[model_type, v5] = multimodal_model(tmp_path_factory.mktemp(f"{model_type}{v5}"), model_type, v5)
    return out


@pytest.mark.parametrize("v5", [False, True], ids=["hub-names", "v5-names"])
@pytest.mark.parametrize("model_type", list(CONFIGS))
def test_the_text_model_of_a_multimodal_checkpoint_equals_transformers(models, tmp_path, model_type, v5):
    """cap's forward of the text model (1 and 2 stages, padding) = transformers' multimodal model's logits."""
    folder = models[model_type, v5]
    ids, cc = batch(pad_from=14)
    real = torch.ones(2, T, dtype=torch.bool)
    real[1, 14:] = False
    with torch.no_grad():
        ref = transformers.AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32)
        want = ref(input_ids=ids, attention_mask=real.long()).logits
        spec = make_spec(folder, tmp_path, use_control_adapters=True, pipeline_stages=2)
        got = run_layers(build_pipeline_layers(spec, stage=0) + build_pipeline_layers(spec, stage=1), ids, cc)
    assert (got[real] - want[real]).abs().max() <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("model_type", list(CONFIGS))
def test_a_multimodal_checkpoint_trains_exports_and_merges(models, tmp_path, model_type):
    """cap-train (control adapters on the writers, 3 steps) on the hub-named checkpoint; the additive LoRA
    loads in PEFT on transformers' multimodal model and `verify` finds it equal to cap's forward; the
    merge keeps every tensor name and dtype of the checkpoint (vision tower too), changes only the
    text model's writers, and verifies."""
    folder = models[model_type, False]
    cfg = write_config(
        tmp_path, folder, use_control_adapters=True, control_adapter_target="writers", max_steps=3, evals_per_run=2
    )
    run_train(cfg)
    record = metrics(tmp_path / "out")
    assert record[3]["eval/loss_all"] < record[0]["eval/loss_all"]
    ckpt = tmp_path / "out" / "epoch1"
    assert run("additive", folder, ckpt, tmp_path / "lora").exit_code == 0
    keys = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    assert all(k.startswith("base_model.model.model.language_model.layers.") for k in keys), list(keys)[:2]
    with torch.device("cpu"):
        hf = transformers.AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32)
    wrapped = [
        n for n, m in peft.PeftModel.from_pretrained(hf, tmp_path / "lora").named_modules() if hasattr(m, "lora_A")
    ]
    assert wrapped and all(".language_model.layers." in n for n in wrapped), wrapped  # none in the vision tower
    r, gap = _verify(folder, tmp_path / "lora")
    assert r.exit_code == 0 and gap < 1e-4, r.output
    assert "additive LoRA (PEFT)" in r.output

    assert run("merge", folder, tmp_path / "lora", tmp_path / "merged").exit_code == 0
    before, after = load_file(folder / "model.safetensors"), load_file(tmp_path / "merged" / "model.safetensors")
    assert {k: v.dtype for k, v in after.items()} == {k: v.dtype for k, v in before.items()}
    changed = sorted(k for k in after if not torch.equal(after[k], before[k]))
    assert changed and all(
        k.startswith("language_model.model.layers.") and k.endswith(("o_proj.weight", "down_proj.weight"))
        for k in changed
    ), changed
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["model_type"] == model_type
    r, gap = _verify(folder, tmp_path / "merged")
    assert r.exit_code == 0 and gap < 1e-4, r.output


def test_a_full_fine_tune_of_a_multimodal_checkpoint_is_refused_in_one_line(models, tmp_path):
    from cap_common.config import load_config
    from cap_common.errors import CapError

    cfg = write_config(tmp_path, models["mistral3", False], full_fine_tune=True)
    with pytest.raises(CapError) as e:
        load_config(str(cfg))
    assert "full_fine_tune of a multimodal model (mistral3) is not supported yet" in str(e.value)
    assert "\n" not in str(e.value)
