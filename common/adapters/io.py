"""Adapter folders: `adapter_model.safetensors` + `adapter_config.json` (DESIGN 3.1).

Key layout (i = decoder layer index):
- control adapters: base_model.model.model.layers.{i}.control_A.weight [r,H], .control_B.weight [H,r];
  spectral: base_model.model.model.layers.{i}.control_Q [H,r], .control_S [r]
- LoRA (PEFT naming): base_model.model.model.layers.{i}.<module path>.lora_A.weight [r,in],
  .lora_B.weight [out,r]
The config is PEFT-LoraConfig-shaped, plus control_adapter_type / control_adapter_target for
control adapters; a control adapter folder without them (qlora-pipe-lite's) means full / block.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from common.adapters.factors import CONTROL_TYPES
from common.errors import CapError
from common.files import fsync, write_json

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
PREFIX = "base_model.model.model.layers."
CONTROL_TARGETS = ("block", "writers")

_CONTROL_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.control_(?:(A|B)\.weight|(Q|S))$")
_LORA_KEY = re.compile(r"^(.*)\.lora_(A|B)\.weight$")


# ---------------------------------------------------------------- key names
def control_key(layer: int, name: str) -> str:
    """name "A"/"B" → `…layers.{i}.control_A.weight`; "Q"/"S" → `…layers.{i}.control_Q`."""
    suffix = f"control_{name}.weight" if name in ("A", "B") else f"control_{name}"
    return f"{PREFIX}{layer}.{suffix}"


def lora_key(layer: int, module_path: str, name: str) -> str:
    """(3, "self_attn.q_proj", "A") → base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight."""
    return f"{PREFIX}{layer}.{module_path}.lora_{name}.weight"


def control_tensors(states: dict[int, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """{layer: ControlAdapter.state()} → the saved key layout. Inverse of control_state_by_layer."""
    return {control_key(layer, name): t for layer, state in states.items() for name, t in state.items()}


def control_state_by_layer(tensors: dict[str, torch.Tensor]) -> dict[int, dict[str, torch.Tensor]]:
    """Saved control tensors → {layer: {"A", "B"} or {"Q", "S"}}, layers ascending; other keys ignored."""
    out: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        m = _CONTROL_KEY.search(key)
        if m:
            out.setdefault(int(m.group(1)), {})[m.group(2) or m.group(3)] = value
    return dict(sorted(out.items()))


# ---------------------------------------------------------------- config
def adapter_config_for(cfg, layers: list[int], base_model_path, target_modules: list[str] | None = None) -> dict:
    """PEFT-LoraConfig-shaped dict for the adapters trained under `cfg` on `layers`.

    target_modules: the LoRA modules actually wrapped (last name components); default
    cfg.target_modules, or PEFT's "all-linear" when that is unset. [] for control adapters.
    """
    control = cfg.use_control_adapters
    if control:
        targets = []
    else:
        targets = target_modules if target_modules is not None else cfg.target_modules
        targets = sorted(set(targets)) if targets is not None else "all-linear"
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base_model_path),
        "r": cfg.lora_rank,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.lora_dropout,
        "target_modules": targets,
        "layers_to_transform": sorted(int(i) for i in layers),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
    }
    if control:
        config["control_adapter_type"] = cfg.control_adapter_type
        config["control_adapter_target"] = cfg.control_adapter_target
    return config


# ---------------------------------------------------------------- saving
def save_adapter(folder, tensors: dict[str, torch.Tensor], adapter_config: dict) -> Path:
    """Write `folder`/adapter_model.safetensors + adapter_config.json without ever leaving a part-file.

    A new folder is built under a temporary name beside it and renamed into place (atomic). Into an
    existing folder, each file is written to a temporary name and os.replace'd: weights, then config.
    """
    folder = Path(folder)
    plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    folder.parent.mkdir(parents=True, exist_ok=True)
    if not folder.exists():
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
        try:
            save_file(plain, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
            fsync(tmp / WEIGHTS_NAME)
            write_json(tmp / CONFIG_NAME, adapter_config, sort_keys=True)
            os.rename(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return folder
    tmp_weights = folder / f".{WEIGHTS_NAME}.tmp-{os.getpid()}"
    tmp_config = folder / f".{CONFIG_NAME}.tmp-{os.getpid()}"
    try:
        save_file(plain, tmp_weights, metadata={"format": "pt"})
        fsync(tmp_weights)
        write_json(tmp_config, adapter_config, sort_keys=True)
        os.replace(tmp_weights, folder / WEIGHTS_NAME)
        os.replace(tmp_config, folder / CONFIG_NAME)
    finally:
        tmp_weights.unlink(missing_ok=True)
        tmp_config.unlink(missing_ok=True)
    return folder


# ---------------------------------------------------------------- loading
def load_adapter(folder) -> tuple[dict[str, torch.Tensor], dict]:
    """Read and validate an adapter folder → (tensors, adapter_config).

    Control adapter configs get control_adapter_type "full" / control_adapter_target "block" when
    absent. Every problem is a CapError naming the file (and key).
    """
    folder = Path(folder)
    weights, config_path = folder / WEIGHTS_NAME, folder / CONFIG_NAME
    if not folder.is_dir():
        raise CapError(f"{folder}: adapter folder not found (expected {WEIGHTS_NAME} and {CONFIG_NAME} in it)")
    for path in (weights, config_path):
        if not path.is_file():
            raise CapError(f"{path}: file not found (an adapter folder holds {WEIGHTS_NAME} and {CONFIG_NAME})")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CapError(f"{config_path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise CapError(f"{config_path}: expected a JSON object, got {type(config).__name__}")
    try:
        tensors = load_file(weights)
    except Exception as e:  # safetensors raises its own error type, or OSError/ValueError
        raise CapError(f"{weights}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    control = control_state_by_layer(tensors)
    if control:
        config.setdefault("control_adapter_type", "full")
        config.setdefault("control_adapter_target", "block")
        _check_control(control, config, weights, config_path)
    else:
        _check_lora(tensors, config, weights)
    return tensors, config


def _shape(t: torch.Tensor) -> list[int]:
    return list(t.shape)


def _check_control(states: dict, config: dict, weights: Path, config_path: Path) -> None:
    kind, target = config["control_adapter_type"], config["control_adapter_target"]
    if kind not in CONTROL_TYPES:
        raise CapError(f"{config_path}: control_adapter_type = {kind!r}; expected one of {', '.join(CONTROL_TYPES)}")
    if target not in CONTROL_TARGETS:
        raise CapError(f"{config_path}: control_adapter_target = {target!r}; expected one of {', '.join(CONTROL_TARGETS)}")
    names = ("Q", "S") if kind == "spectral" else ("A", "B")
    rank = config.get("r")
    hidden = None
    for layer, state in states.items():
        for name in names:
            if name not in state:
                raise CapError(f"{weights}: missing key {control_key(layer, name)} "
                               f"(control_adapter_type {kind!r} has {' and '.join(names)} per layer)")
        extra = sorted(set(state) - set(names))
        if extra:
            raise CapError(f"{weights}: unexpected key {control_key(layer, extra[0])} for control_adapter_type {kind!r}")
        first = state[names[0]]
        if first.dim() != 2:
            raise CapError(f"{weights}: {control_key(layer, names[0])} has shape {_shape(first)}; expected 2 dimensions")
        H, r = first.shape if kind == "spectral" else reversed(first.shape)
        rank = r if rank is None else rank
        hidden = H if hidden is None else hidden
        for name in names:
            want = {"Q": [hidden, rank], "S": [rank], "A": [rank, hidden], "B": [hidden, rank]}[name]
            if _shape(state[name]) != want:
                raise CapError(f"{weights}: {control_key(layer, name)} has shape {_shape(state[name])}; expected "
                               f"{want} (rank r = {rank} from {CONFIG_NAME}, hidden size {hidden})")


def _check_lora(tensors: dict, config: dict, weights: Path) -> None:
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        m = _LORA_KEY.match(key)
        if m:
            pairs.setdefault(m.group(1), {})[m.group(2)] = value
    if not pairs:
        raise CapError(f"{weights}: no adapter tensors (expected *.control_A.weight / *.control_Q or *.lora_A.weight keys)")
    rank = None if config.get("rank_pattern") else config.get("r")
    for module, pair in pairs.items():
        for name in ("A", "B"):
            if name not in pair:
                raise CapError(f"{weights}: missing key {module}.lora_{name}.weight (LoRA has lora_A and lora_B per module)")
            if pair[name].dim() != 2:
                raise CapError(f"{weights}: {module}.lora_{name}.weight has shape {_shape(pair[name])}; expected 2 dimensions")
        r = pair["A"].shape[0] if rank is None else rank
        if pair["A"].shape[0] != r or pair["B"].shape[1] != r:
            raise CapError(f"{weights}: {module}.lora_A.weight {_shape(pair['A'])} and .lora_B.weight {_shape(pair['B'])} "
                           f"do not share rank r = {r} (lora_A is [r, in], lora_B is [out, r])")
