"""What a run leaves behind in <output_dir>/epoch<N>/, gathered from every pipeline stage.

Each stage's first data-parallel rank saves its part (`epoch<N>.parts/stage<s>.safetensors`);
global rank 0 then writes the folder under a temp name and renames it into place (an existing one
is set aside first and removed after: `swap_in`). cap-export takes the same files from a checkpoint
(`write_checkpoint_adapter`). What the folder holds:
- control adapters: adapter_model.safetensors in cap's key layout + adapter_config.json
  (docs/formats.md, section 4)
- LoRA / QLoRA: the same two files in PEFT's layout (PeftModel.from_pretrained loads them)
- full fine-tune: a Hugging Face model folder (one safetensors shard per stage + index,
  config and tokenizer files copied from model_dir)
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from cap_common.adapters import factors
from cap_common.adapters.control import ControlAdapter
from cap_common.adapters.io import adapter_config_for, control_key, lora_key, save_adapter, save_weights
from cap_common.adapters.lora import LoraLinear
from cap_common.errors import CapError
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
    names, pairs = [], []
    for layer in _decoder_layers(model):
        if isinstance(layer.adapter, ControlAdapter):
            names.append(("adapter/{}/" + f"layer{layer.index:03d}"))
            pairs.append(layer.adapter.norm_factors())
        for path, m in layer.layer.named_modules():
            if isinstance(m, LoraLinear):
                names.append("lora/{}/" + f"layer{layer.index:03d}.{path}")
                pairs.append(m.norm_factors())
    out = {}
    for name, (frobenius, spectral) in zip(names, factors.norms(pairs)):  # one copy from the device
        out[name.format("frobenius")] = frobenius
        out[name.format("spectral")] = spectral
    return out


# A checkpoint's trainable tensors by DeepSpeed's parameter names (cap_train/train_state.py): the
# pipeline position (decoder layer index + 1) first, then the module path in the stage.
_CONTROL_PARAM = re.compile(r"(\d+)\.adapter\.(A|B|Q|S)")
_LORA_PARAM = re.compile(r"(\d+)\.layer\.(.+)\.lora_(A|B)\.weight")


def checkpoint_adapter_tensors(params: dict[str, torch.Tensor], cfg) -> dict[str, torch.Tensor]:
    """A checkpoint's trainable weights (parameter name → tensor) keyed and valued as `adapter_tensors`
    gives the same weights of a live model: a control adapter's through ControlAdapter.state() (spectral:
    orth(Q)), LoRA pairs renamed. ValueError naming a tensor that is neither."""
    out, control = {}, {}
    for name, t in params.items():
        if m := _CONTROL_PARAM.fullmatch(name):
            control.setdefault(int(m[1]) - 1, {})[m[2]] = t
        elif m := _LORA_PARAM.fullmatch(name):
            out[lora_key(int(m[1]) - 1, m[2], m[3])] = t
        else:
            raise ValueError(f"holds {name}, which is not an adapter weight")
    for layer, state in sorted(control.items()):
        first = state["Q"] if "Q" in state else state["A"]
        hidden = first.shape[0] if "Q" in state else first.shape[1]
        adapter = ControlAdapter(hidden, cfg.lora_rank, cfg.alpha, cfg.control_adapter_type, dtype=first.dtype)
        adapter.load_state(state)
        out.update({control_key(layer, n): t for n, t in adapter.state().items()})
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in out.items()}


def write_checkpoint_adapter(checkpoint: Path, folder: Path) -> None:
    """Write the adapter that a cap checkpoint (format 3: checkpoints/step<N>/) holds into the new folder
    `folder`: the files write_epoch_output writes for an epoch<N>/ folder of the same weights, from the run's
    config recorded in state.json. A CapError naming the checkpoint when it is damaged or holds no adapter
    (a full fine-tune, a checkpoint of an older cap)."""
    from safetensors import safe_open

    from cap_common.config import Config
    from cap_train.checkpoint import damage, read_state

    checkpoint = Path(checkpoint)
    try:
        state = read_state(checkpoint)
        problem = damage(checkpoint, state)
    except (ValueError, OSError) as e:
        problem = str(e)
    if problem:
        raise CapError(f"{checkpoint}: damaged checkpoint ({problem})")
    run = state.get("run")
    if state.get("format", 1) < 3 or not isinstance(run, dict):
        raise CapError(
            f"{checkpoint}: a checkpoint of an older cap (format {state.get('format', 1)}), from which cap-export "
            "cannot take the adapter; use the run's epoch<N>/ folder"
        )
    fields = {f.name for f in dataclasses.fields(Config) if not f.metadata.get("internal")}
    try:
        cfg = Config(**{k: v for k, v in run.items() if k in fields and k != "datasets"}, datasets=())
    except TypeError as e:
        raise CapError(f"{checkpoint}/state.json: the recorded run lacks a config key ({e})") from None
    if cfg.mode == "full":
        raise CapError(
            f"{checkpoint}: a full fine-tune checkpoint; cap-export reads adapters (the run's epoch<N>/ folders "
            "hold the trained model as a Hugging Face model folder)"
        )
    part_dir = make_temp_dir(folder.parent, folder.name + ".parts")
    try:
        for part in sorted(checkpoint.glob("trainable-stage*.safetensors")):
            with safe_open(str(part), framework="pt") as f:
                params = {k: f.get_tensor(k) for k in f.keys() if "#" not in k}  # not the optimizer state
            try:
                tensors = checkpoint_adapter_tensors(params, cfg)
            except ValueError as e:
                raise CapError(f"{part}: {e}") from None
            if tensors:
                save_weights(tensors, part_dir / f"stage{part.stem.rsplit('stage', 1)[1]}.safetensors")
        write_epoch_output(cfg, part_dir, folder)
    finally:
        shutil.rmtree(part_dir, ignore_errors=True)


def write_epoch_output(cfg, part_dir: Path, folder: Path) -> None:
    """Rank 0: combine the stage parts into `folder`, which appears whole: the new folder is written under
    a temporary name beside it (cap_common.files.temp_name) and swapped in (`swap_in`), so a reader
    finds the old complete folder or the new one, never a mix."""
    parts = sorted(part_dir.glob("stage*.safetensors"), key=lambda p: int(p.stem[5:]))
    tmp = make_temp_dir(folder.parent, folder.name)
    try:
        if cfg.mode == "full":
            _fill_full_model(cfg, parts, tmp)
        else:
            tensors = {}
            for p in parts:
                tensors.update(load_file(str(p)))
            layers = sorted({int(k.split(".layers.")[1].split(".")[0]) for k in tensors})
            targets = sorted({k.rsplit(".lora_A", 1)[0].rsplit(".", 1)[1] for k in tensors if ".lora_A" in k}) or None
            save_adapter(tmp, tensors, adapter_config_for(cfg, layers, cfg.model_dir, targets))
        swap_in(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def aside_name(name: str) -> str:
    """The temporary name an existing output folder `name` has while `swap_in` replaces it:
    `.{name}.old.tmp-{host}-{pid}-{nonce}` (worker.clean_outputs puts it back if the swap was cut short)."""
    return temp_name(f"{name}.old")


def swap_in(tmp: Path, folder: Path) -> None:
    """Rename the complete folder `tmp` to `folder`. An existing `folder` is renamed aside first and
    removed after; if the second rename fails, the old folder is renamed back. At every moment
    `folder` is the old complete folder, the new one, or (between the renames) absent."""
    if not folder.exists():
        os.rename(tmp, folder)
        return
    old = folder.parent / aside_name(folder.name)
    os.rename(folder, old)
    try:
        os.rename(tmp, folder)
    except BaseException:
        os.rename(old, folder)
        raise
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
