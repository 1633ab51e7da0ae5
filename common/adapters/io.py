"""Adapter folders: `adapter_model.safetensors` + `adapter_config.json` (docs/formats.md, section 4).
qlora-pipe-lite's `adapter_model.bin` (a pickled state dict) is read too, weights-only: no code runs.

Key layout (i = decoder layer index):
- control adapters: base_model.model.model.layers.{i}.control_A.weight [r,H], .control_B.weight [H,r];
  spectral: base_model.model.model.layers.{i}.control_Q [H,r], .control_S [r]
- LoRA (PEFT naming): base_model.model.model.layers.{i}.<module path>.lora_A.weight [r,in],
  .lora_B.weight [out,r]
The config is PEFT-LoraConfig-shaped, plus control_adapter_type / control_adapter_target for
control adapters. A control adapter folder without them (qlora-pipe-lite's) means target block and
the type its tensor names show: control_Q / control_S spectral, control_A / control_B full.
Over 300 lines because it is the one reader of every adapter file a user may hand cap (both
generations' layouts, .safetensors and weights-only .bin) and checks each field they may get wrong.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from cap_common.adapters.factors import CONTROL_TYPES
from cap_common.errors import CapError
from cap_common.files import follow_umask, fsync, make_temp_dir, temp_name, write_json

WEIGHTS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"  # qlora-pipe-lite's pickled state dict (read only, weights-only)
CONFIG_NAME = "adapter_config.json"
PREFIX = "base_model.model.model.layers."
CONTROL_TARGETS = ("block", "writers")

_CONTROL_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.control_(?:(A|B)\.weight|(Q|S))$")
_AB_TYPES = ("full", "symmetrise", "antisymmetrise")
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
def save_weights(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """save_file + fsync, with umask permissions (safetensors makes the file 0600); its own write
    error (disk full, ...) becomes a CapError naming `path`."""
    try:
        save_file(tensors, path, metadata={"format": "pt"})
    except SafetensorError as e:
        raise CapError(f"{path}: cannot write ({e})") from None
    follow_umask(path, directory=False)
    fsync(path)


def save_adapter(folder, tensors: dict[str, torch.Tensor], adapter_config: dict) -> Path:
    """Write `folder`/adapter_model.safetensors + adapter_config.json without ever leaving a part-file.

    A new folder is built under a temporary name beside it (common.files.make_temp_dir: umask
    permissions, owner in the name) and renamed into place (atomic). Into an existing folder, each
    file is written to a temporary name and os.replace'd: weights, then config.
    """
    folder = Path(folder)
    plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    if not folder.exists():
        tmp = make_temp_dir(folder.parent, folder.name)
        try:
            save_weights(plain, tmp / WEIGHTS_NAME)
            write_json(tmp / CONFIG_NAME, adapter_config, sort_keys=True)
            os.rename(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return folder
    tmp_weights, tmp_config = folder / temp_name(WEIGHTS_NAME), folder / temp_name(CONFIG_NAME)
    try:
        save_weights(plain, tmp_weights)
        write_json(tmp_config, adapter_config, sort_keys=True)
        os.replace(tmp_weights, folder / WEIGHTS_NAME)
        os.replace(tmp_config, folder / CONFIG_NAME)
    finally:
        tmp_weights.unlink(missing_ok=True)
        tmp_config.unlink(missing_ok=True)
    return folder


# ---------------------------------------------------------------- loading
def weights_file(folder) -> Path:
    """The adapter's weights in `folder`: adapter_model.safetensors, else qlora-pipe-lite's
    adapter_model.bin; the safetensors path when there is neither (for messages)."""
    folder = Path(folder)
    for name in (WEIGHTS_NAME, BIN_NAME):
        if (folder / name).is_file():
            return folder / name
    return folder / WEIGHTS_NAME


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """{key: tensor} from a safetensors file, or from a .bin with torch.load(weights_only=True): only
    a dict of str → tensor is accepted, nothing else in the pickle is ever constructed or run."""
    path = Path(path)
    if path.suffix != ".bin":
        try:
            return load_file(path)
        except Exception as e:  # safetensors raises its own error type, or OSError/ValueError
            raise CapError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error below says enough
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as e:  # UnpicklingError (a global the file needs), RuntimeError (not a zip/pickle), EOFError
        text = " ".join(str(e).split())
        m = re.search(r"unsupported (?:global: )?GLOBAL (\S+)", text, re.IGNORECASE)
        if m:
            raise CapError(
                f"{path}: needs the Python object {m.group(1)} to load; only a plain state dict (names → "
                f"tensors) is read from a .bin, weights-only, so no code in it runs"
            ) from None
        detail = re.search(r"WeightsUnpickler error: (.*?)(?: Please file an issue| Check the documentation|$)", text)
        text = (detail.group(1) if detail else text)[:200] or "the file ends early"
        raise CapError(f"{path}: not a readable PyTorch state dict ({type(e).__name__}: {text})") from None
    if not isinstance(state, dict):
        raise CapError(f"{path}: holds a {type(state).__name__}; expected a state dict (names → tensors)")
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CapError(
                f"{path}: entry {str(key)[:80]!r} is {type(value).__name__}, not a tensor; expected a state dict "
                f"(names → tensors)"
            )
    return dict(state)


def detect_control_type(states: dict[int, dict[str, torch.Tensor]], weights: Path, hint: str | None = None) -> str:
    """control_adapter_type from the tensor names, for a config that names none (qlora-pipe-lite's):
    control_Q / control_S → spectral (its Sep 2025 design on), control_A / control_B → `hint` when
    that is an A/B type (its Aug 2025 run TOML), else full."""
    names = set().union(*states.values())
    if names <= {"Q", "S"}:
        return "spectral"
    if names <= {"A", "B"}:
        return hint if hint in _AB_TYPES else "full"
    raise CapError(
        f"{weights}: holds both control_A / control_B and control_Q / control_S keys; a Control Adapter has "
        f"one kind (A/B: full, symmetrise, antisymmetrise; Q/S: spectral)"
    )


def load_adapter(folder, control_type: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Read and validate an adapter folder → (tensors, adapter_config).

    The weights are adapter_model.safetensors, or adapter_model.bin when there is no safetensors
    file. A control adapter config without control_adapter_type gets the type its tensor names show
    (`detect_control_type`; `control_type` is the hint for A/B tensors), and control_adapter_target
    "block" when absent. Every problem is a CapError naming the file (and key).
    """
    folder = Path(folder)
    weights, config_path = weights_file(folder), folder / CONFIG_NAME
    if not folder.is_dir():
        raise CapError(f"{folder}: adapter folder not found (expected {WEIGHTS_NAME} and {CONFIG_NAME} in it)")
    for path in (weights, config_path):
        if not path.is_file():
            raise CapError(
                f"{path}: file not found (an adapter folder holds {WEIGHTS_NAME} or {BIN_NAME}, and {CONFIG_NAME})"
            )
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CapError(f"{config_path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise CapError(f"{config_path}: expected a JSON object, got {type(config).__name__}")
    check_types(config, CONFIG_TYPES, config_path)
    tensors = read_weights(weights)
    control = control_state_by_layer(tensors)
    if control:
        if "control_adapter_type" not in config:
            config["control_adapter_type"] = detect_control_type(control, weights, control_type)
        config.setdefault("control_adapter_target", "block")
        _check_control(control, config, weights, config_path)
    else:
        _check_lora(tensors, config, weights)
    for key, tensor in tensors.items():
        bad = non_finite(tensor)
        if bad:
            raise CapError(
                f"{weights}: {key} holds {bad}; an adapter with NaN or Inf cannot be used (did training diverge?)"
            )
    return tensors, config


def non_finite(tensor: torch.Tensor) -> str | None:
    """None when every value is finite (or the dtype is not floating), else 'N NaN and M ±Inf of T values'."""
    if not tensor.is_floating_point() or bool(torch.isfinite(tensor).all()):
        return None
    return f"{int(torch.isnan(tensor).sum())} NaN and {int(torch.isinf(tensor).sum())} ±Inf of {tensor.numel()} values"


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_str_list(v) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


# adapter_config.json key → (accepts the value, what is expected); keys that are absent are not checked.
CONFIG_TYPES = {
    "base_model_name_or_path": (lambda v: v is None or isinstance(v, str), "a string or null"),
    "r": (lambda v: is_int(v) and v > 0, "a positive integer"),
    "lora_alpha": (lambda v: v is None or is_number(v), "a finite number"),
    "target_modules": (
        lambda v: v is None or isinstance(v, str) or _is_str_list(v),
        "a list of strings, a string or null",
    ),
    "layers_to_transform": (
        lambda v: v is None or is_int(v) or (isinstance(v, list) and all(map(is_int, v))),
        "an integer, a list of integers or null",
    ),
    "control_adapter_type": (lambda v: isinstance(v, str), "a string"),
    "control_adapter_target": (lambda v: isinstance(v, str), "a string"),
    "rank_pattern": (
        lambda v: v is None or (isinstance(v, dict) and all(is_int(x) and x > 0 for x in v.values())),
        "an object mapping module patterns to positive integers",
    ),
    "alpha_pattern": (
        lambda v: v is None or (isinstance(v, dict) and all(map(is_number, v.values()))),
        "an object mapping module patterns to finite numbers",
    ),
    "multiplicative": (lambda v: isinstance(v, bool), "true or false"),
    "use_rslora": (lambda v: isinstance(v, bool), "true or false"),
}


def check_types(obj: dict, types: dict, path: Path) -> None:
    """Each key of `types` present in the JSON object `obj` read from `path` has an accepted value,
    else a CapError naming the file, the key, the value and what was expected."""
    for key, (accepts, expected) in types.items():
        if key in obj and not accepts(obj[key]):
            shown = json.dumps(obj[key])
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            raise CapError(f"{path}: {key} = {shown}; expected {expected}")


def _shape(t: torch.Tensor) -> list[int]:
    return list(t.shape)


def _check_control(states: dict, config: dict, weights: Path, config_path: Path) -> None:
    kind, target = config["control_adapter_type"], config["control_adapter_target"]
    if kind not in CONTROL_TYPES:
        raise CapError(f"{config_path}: control_adapter_type = {kind!r}; expected one of {', '.join(CONTROL_TYPES)}")
    if target not in CONTROL_TARGETS:
        raise CapError(
            f"{config_path}: control_adapter_target = {target!r}; expected one of {', '.join(CONTROL_TARGETS)}"
        )
    names = ("Q", "S") if kind == "spectral" else ("A", "B")
    rank = config.get("r")
    hidden = None
    for layer, state in states.items():
        for name in names:
            if name not in state:
                raise CapError(
                    f"{weights}: missing key {control_key(layer, name)} "
                    f"(control_adapter_type {kind!r} has {' and '.join(names)} per layer)"
                )
        extra = sorted(set(state) - set(names))
        if extra:
            raise CapError(
                f"{weights}: unexpected key {control_key(layer, extra[0])} for control_adapter_type {kind!r}"
            )
        first = state[names[0]]
        if first.dim() != 2:
            raise CapError(
                f"{weights}: {control_key(layer, names[0])} has shape {_shape(first)}; expected 2 dimensions"
            )
        H, r = first.shape if kind == "spectral" else reversed(first.shape)
        if r < 1:
            raise CapError(f"{weights}: {control_key(layer, names[0])} has shape {_shape(first)}: rank 0")
        rank = r if rank is None else rank
        hidden = H if hidden is None else hidden
        for name in names:
            want = {"Q": [hidden, rank], "S": [rank], "A": [rank, hidden], "B": [hidden, rank]}[name]
            if _shape(state[name]) != want:
                raise CapError(
                    f"{weights}: {control_key(layer, name)} has shape {_shape(state[name])}; expected "
                    f"{want} (rank r = {rank} from {CONFIG_NAME}, hidden size {hidden})"
                )


def _check_lora(tensors: dict, config: dict, weights: Path) -> None:
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        m = _LORA_KEY.match(key)
        if m:
            pairs.setdefault(m.group(1), {})[m.group(2)] = value
    if not pairs:
        raise CapError(
            f"{weights}: no adapter tensors (expected *.control_A.weight / *.control_Q or *.lora_A.weight keys)"
        )
    rank = None if config.get("rank_pattern") else config.get("r")
    for module, pair in pairs.items():
        for name in ("A", "B"):
            if name not in pair:
                raise CapError(
                    f"{weights}: missing key {module}.lora_{name}.weight (LoRA has lora_A and lora_B per module)"
                )
            if pair[name].dim() != 2:
                raise CapError(
                    f"{weights}: {module}.lora_{name}.weight has shape {_shape(pair[name])}; expected 2 dimensions"
                )
        r = pair["A"].shape[0] if rank is None else rank
        if pair["A"].shape[0] < 1:
            raise CapError(f"{weights}: {module}.lora_A.weight has shape {_shape(pair['A'])}: rank 0")
        if pair["A"].shape[0] != r or pair["B"].shape[1] != r:
            raise CapError(
                f"{weights}: {module}.lora_A.weight {_shape(pair['A'])} and .lora_B.weight {_shape(pair['B'])} "
                f"do not share rank r = {r} (lora_A is [r, in], lora_B is [out, r])"
            )
