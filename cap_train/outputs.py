"""What a run leaves behind in <output_dir>/epoch<N>/, gathered from every pipeline stage.

Each stage's first data-parallel rank saves its part (`epoch<N>.parts/stage<s>.safetensors`);
global rank 0 then writes the folder under a temp name and renames it into place:
- control adapters: adapter_model.safetensors in cap's key layout + adapter_config.json
  (docs/formats.md, section 4)
- LoRA / QLoRA: the same two files in PEFT's layout (PeftModel.from_pretrained loads them)
- full fine-tune: a Hugging Face model folder (one safetensors shard per stage + index,
  config and tokenizer files copied from model_dir)
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from cap_common.adapters.control import ControlAdapter
from cap_common.adapters.io import adapter_config_for, control_key, lora_key, save_adapter, save_weights
from cap_common.adapters.lora import LoraLinear
from cap_common.files import make_temp_dir, temp_name, write_json
from cap_common.models.layers import DecoderLayerPipe, EmbeddingPipe, LmHeadPipe

COPIED = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
)


def _decoder_layers(model):
    return [m for m in model.modules() if isinstance(m, DecoderLayerPipe)]


def adapter_tensors(model, cfg) -> dict[str, torch.Tensor]:
    """This stage's trained tensors, keyed as they are saved."""
    out = {}
    if cfg.mode == "full":
        for module in model.modules():
            if isinstance(module, EmbeddingPipe):
                out["model.embed_tokens.weight"] = module.embed.weight
            elif isinstance(module, DecoderLayerPipe):
                for name, p in module.layer.state_dict().items():
                    out[f"model.layers.{module.index}.{name}"] = p
            elif isinstance(module, LmHeadPipe):
                out["model.norm.weight"] = module.norm.weight
                out["lm_head.weight"] = module.head.weight
    else:
        for layer in _decoder_layers(model):
            if isinstance(layer.adapter, ControlAdapter):
                for name, t in layer.adapter.state().items():
                    out[control_key(layer.index, name)] = t
            for path, m in layer.layer.named_modules():
                if isinstance(m, LoraLinear):
                    out[lora_key(layer.index, path, "A")] = m.lora_A.weight
                    out[lora_key(layer.index, path, "B")] = m.lora_B.weight
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in out.items()}


def adapter_norms(model) -> dict[str, float]:
    """Per-layer ‖W'‖_F and spectral norm of each control adapter (or LoRA pair) of this stage."""
    out = {}
    for layer in _decoder_layers(model):
        if isinstance(layer.adapter, ControlAdapter):
            for kind, v in layer.adapter.norms().items():
                out[f"adapter/{kind}/layer{layer.index:03d}"] = float(v)
        for path, m in layer.layer.named_modules():
            if isinstance(m, LoraLinear):
                for kind, v in m.norms().items():
                    out[f"lora/{kind}/layer{layer.index:03d}.{path}"] = float(v)
    return out


def write_epoch_output(cfg, part_dir: Path, folder: Path) -> None:
    """Rank 0: combine the stage parts into `folder` (atomically)."""
    parts = sorted(part_dir.glob("stage*.safetensors"), key=lambda p: int(p.stem[5:]))
    if cfg.mode == "full":
        _write_full_model(cfg, parts, folder)
        return
    tensors = {}
    for p in parts:
        tensors.update(load_file(str(p)))
    layers = sorted({int(k.split(".layers.")[1].split(".")[0]) for k in tensors})
    targets = sorted({k.rsplit(".lora_A", 1)[0].rsplit(".", 1)[1] for k in tensors if ".lora_A" in k}) or None
    save_adapter(folder, tensors, adapter_config_for(cfg, layers, cfg.model_dir, targets))


def _write_full_model(cfg, parts: list[Path], folder: Path) -> None:
    tmp = make_temp_dir(folder.parent, folder.name)
    try:
        _fill_full_model(cfg, parts, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if folder.exists():  # replaced only once the new folder is complete
        old = folder.parent / temp_name(folder.name)
        os.rename(folder, old)
    os.rename(tmp, folder)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _fill_full_model(cfg, parts: list[Path], tmp: Path) -> None:
    config = json.loads((Path(cfg.model_dir) / "config.json").read_text())
    tied = config.get("tie_word_embeddings", False)
    weight_map, total = {}, 0
    for i, p in enumerate(parts):
        tensors = load_file(str(p))
        if tied:
            tensors.pop("lm_head.weight", None)
        name = f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors"
        save_weights(tensors, tmp / name)
        for k, t in tensors.items():
            weight_map[k] = name
            total += t.numel() * t.element_size()
    write_json(
        tmp / "model.safetensors.index.json",
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
    )
    for name in COPIED:
        if (Path(cfg.model_dir) / name).is_file():
            shutil.copyfile(Path(cfg.model_dir) / name, tmp / name)  # plain copy: umask permissions
