"""The adapters cap-export reads: a trained Control Adapter and a PEFT LoRA, as loaded models.

- `Control` / `load_control`: a Control Adapter (cap's or qlora-pipe-lite's: A/B or Q/S keys,
  .safetensors or .bin, type from the config, the run TOML or the tensor names) and its W' factors
  in each direction (forward, exact inverse, negated).
- `Lora` / `load_lora`: a PEFT LoRA folder (additive, or multiplicative with the "multiplicative"
  marker), with PEFT's per-module scaling.
Every user-facing problem is a one-line CapError naming the file.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cap_common.adapters import factors
from cap_common.adapters.io import control_state_by_layer, load_adapter, weights_file
from cap_common.errors import CapError
from cap_common.models.loading import TEXT_PREFIXES, text_name
from cap_export import note
from cap_export.folders import adapter_folder, named_folder, read_provenance, run_toml_type

LORA_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(.+)\.lora_(A|B)\.weight$")


@dataclass
class Control:
    """A trained Control Adapter: per layer {"A","B"} or {"Q","S"}, and its adapter_config."""

    folder: Path
    config: dict
    states: dict[int, dict[str, torch.Tensor]]

    @property
    def weights(self) -> Path:
        """The weights file read (adapter_model.safetensors or .bin), for messages."""
        return weights_file(self.folder)

    @property
    def adapter_type(self) -> str:
        return self.config["control_adapter_type"]

    @property
    def target(self) -> str:
        return self.config["control_adapter_target"]

    @property
    def layers(self) -> list[int]:
        return list(self.states)

    @property
    def rank(self) -> int:
        first = next(iter(self.states.values()))
        return first["S"].shape[0] if "S" in first else first["A"].shape[0]

    @property
    def hidden_size(self) -> int:
        first = next(iter(self.states.values()))
        return first["Q"].shape[0] if "Q" in first else first["A"].shape[1]

    @property
    def alpha(self) -> float:
        alpha = self.config.get("lora_alpha")
        return float(alpha) if alpha is not None else math.sqrt(self.rank)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def factors(self, layer: int, direction: str = "forward") -> tuple[torch.Tensor, torch.Tensor]:
        """(U [H,k], V [k,H]) in float64 with U·V = W'₊ ("forward"), (I+W'₊)⁻¹ − I ("inverse";
        spectral: W'₋ in closed form, others: Woodbury) or −W'₊ ("negate")."""
        state = {name: t.to(torch.float64) for name, t in self.states[layer].items()}
        if direction == "inverse" and self.adapter_type == "spectral":
            return factors.spectral_factors(state["Q"], state["S"], -1)
        U, V = factors.control_weight_factors(state, self.adapter_type, self.scale)
        if direction == "inverse":
            try:
                return factors.inverse_factors(U, V)
            except CapError as e:
                raise CapError(f"{self.folder}: layer {layer}: {e}") from None
        if direction == "negate":
            return -U, V
        return U, V


def _read(path) -> tuple[Path, dict[str, torch.Tensor], dict, tuple[str, Path] | None]:
    """(folder, tensors, adapter_config, the run TOML's control_adapter_type) of the adapter at `path`."""
    folder = adapter_folder(path)
    from_toml = run_toml_type(folder)
    tensors, config = load_adapter(folder, from_toml[0] if from_toml else None)
    return named_folder(folder), tensors, config, from_toml


def load_control(path) -> Control:
    folder, tensors, config, from_toml = _read(path)
    if not control_state_by_layer(tensors):
        raise CapError(
            f"{weights_file(folder)}: a LoRA adapter, not a Control Adapter "
            f"(no *.control_A / *.control_Q keys); use `cap-export merge` or `gguf` for LoRA"
        )
    return _control(folder, tensors, config, from_toml)


def load_any(path) -> Control | Lora:
    """The Control Adapter or PEFT LoRA at `path`, whichever its tensor names show (read once)."""
    folder, tensors, config, from_toml = _read(path)
    if control_state_by_layer(tensors):
        return _control(folder, tensors, config, from_toml)
    return _lora(folder, tensors, config)


def _control(folder: Path, tensors: dict[str, torch.Tensor], config: dict, from_toml) -> Control:
    states = control_state_by_layer(tensors)
    if from_toml and config["control_adapter_type"] == from_toml[0]:
        note(
            f"control_adapter_type {from_toml[0]!r} from {from_toml[1]} (qlora-pipe-lite kept it only in "
            f"the training config, not in {folder.name}/adapter_config.json)"
        )
    return Control(folder, config, states)


@dataclass
class Lora:
    """A PEFT LoRA: per module (checkpoint-style name, e.g. model.layers.3.mlp.down_proj) its
    (A [r,in], B [out,r]) and scale, and whether it is multiplicative (A [r,out] acts on M's output)."""

    folder: Path
    config: dict
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]
    provenance: dict = field(default_factory=dict)

    @property
    def marked_multiplicative(self) -> bool:
        return bool(self.config.get("multiplicative")) or self.provenance.get("kind") == "multiplicative"

    def scale(self, module: str) -> float:
        """PEFT's scaling of one module: alpha/r (alpha/√r with use_rslora); rank_pattern and
        alpha_pattern keys are regexes matched against the end of the module name, as PEFT does."""
        r = self.pairs[module][0].shape[0]
        alpha = _pattern_value(self.config.get("alpha_pattern") or {}, module, self.config.get("lora_alpha", r))
        return float(alpha) / (math.sqrt(r) if self.config.get("use_rslora") else r)


def _pattern_value(patterns: dict, module: str, default):
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def load_lora(path) -> Lora:
    files = adapter_folder(path)
    tensors, config = load_adapter(files)
    folder = named_folder(files)
    if control_state_by_layer(tensors):
        raise CapError(
            f"{weights_file(folder)}: a Control Adapter, not a LoRA; convert it first with "
            f"`cap-export additive` (or `multiplicative`)"
        )
    return _lora(folder, tensors, config)


def _lora(folder: Path, tensors: dict[str, torch.Tensor], config: dict) -> Lora:
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        m = _LORA_KEY.match(key)
        if m is None:
            raise CapError(
                f"{weights_file(folder)}: unexpected key {key} (only lora_A / lora_B weights can be exported)"
            )
        # a multimodal model's text modules (PEFT's model.language_model.…, the hub's language_model.model.…)
        # by their text-model names
        module = next((text_name(p, m.group(1)) for p in TEXT_PREFIXES if m.group(1).startswith(p)), m.group(1))
        pairs.setdefault(module, {})[m.group(2)] = value
    return Lora(folder, config, {name: (p["A"], p["B"]) for name, p in pairs.items()}, read_provenance(folder))
