"""What cap-export reads and writes: adapter folders, the base model, and its output paths.

- `adapter_folder`: an epoch<N>/ folder, a plain adapter folder, or a training checkpoint with an
  adapter/ subfolder → the folder holding adapter_model.safetensors + adapter_config.json.
- `Control`: a Control Adapter (cap's or qlora-pipe-lite's key layout) and its W' factors.
- `Lora`: a PEFT LoRA folder (additive, or multiplicative with the "multiplicative" marker).
- `Base`: a base model folder: family, config, which file holds each tensor, and where the
  residual writers' weight matrices are (per-expert names for Mixtral, fused or not on disk).
- `check_output` / `staged_output`: OUT is never an input, inside one or above one; it is built
  under a temporary name beside it (owner recorded, see common.files) and renamed at the end.
Every user-facing problem is a one-line CapError naming the file.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from cap_export import note
from cap_common.adapters import factors
from cap_common.adapters.io import (CONFIG_NAME, WEIGHTS_NAME, check_types, control_state_by_layer, is_int, is_number,
                                load_adapter)
from cap_common.errors import CapError
from cap_common.files import make_temp_dir, remove_stale_temps, temp_name, user_os_errors
from cap_common.models.families import WHOLE, Family, family_of, load_hf_config, tensor_sources
from cap_common.models.loading import Checkpoint

PROVENANCE = "cap_export.json"   # beside an exported LoRA or merged model: what it was made from
LORA_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(.+)\.lora_(A|B)\.weight$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")

# Which matrix of W' an export uses: W'₊ (class +1), the exact inverse (I+W')⁻¹−I, or −W'.
DIRECTIONS = ("forward", "inverse", "negate")


# ---------------------------------------------------------------- adapter folders
def adapter_folder(path) -> Path:
    """The folder holding the two adapter files: `path` itself, or `path`/adapter/ (training checkpoint)."""
    path = Path(path)
    if not path.exists():
        raise CapError(f"{path}: not found")
    if not path.is_dir():
        raise CapError(f"{path}: not a folder (expected an epoch<N>/ or adapter folder with {WEIGHTS_NAME} "
                       f"and {CONFIG_NAME})")
    if (path / WEIGHTS_NAME).exists() or (path / CONFIG_NAME).exists():
        return path
    if (path / "adapter" / WEIGHTS_NAME).exists():
        return path / "adapter"
    if (path / "ds").is_dir():
        raise CapError(f"{path}: a training checkpoint without an adapter/ subfolder; use the epoch<N>/ folder "
                       f"(or a checkpoint that holds adapter/{WEIGHTS_NAME} and adapter/{CONFIG_NAME})")
    raise CapError(f"{path}: no {WEIGHTS_NAME} and {CONFIG_NAME} here (expected an epoch<N>/ or adapter folder)")


def _str_or_null(v) -> bool:
    return v is None or isinstance(v, str)


# cap_export.json key → (accepts the value, what is expected); see convert._provenance and merge.merge.
PROVENANCE_TYPES = {
    **{key: (_str_or_null, "a string or null")
       for key in ("kind", "source", "base", "lora", "lora_kind", "model_type", "dtype", "control_adapter_type",
                   "control_adapter_target")},
    "direction": (lambda v: v is None or v in DIRECTIONS, f"one of {', '.join(DIRECTIONS)} or null"),
    "rank": (lambda v: v is None or (is_int(v) and v > 0), "a positive integer or null"),
    "scale": (is_number, "a finite number"),
    "multiplicative": (lambda v: isinstance(v, bool), "true or false"),
}


def read_provenance(folder: Path) -> dict:
    """The cap_export.json record beside an export ({} when there is none); a corrupt one is a CapError."""
    path = Path(folder) / PROVENANCE
    try:
        record = json.loads(path.read_text())
    except OSError:
        return {}
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CapError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(record, dict):
        raise CapError(f"{path}: expected a JSON object, got {type(record).__name__}")
    check_types(record, PROVENANCE_TYPES, path)
    return record


@dataclass
class Control:
    """A trained Control Adapter: per layer {"A","B"} or {"Q","S"}, and its adapter_config."""

    folder: Path
    config: dict
    states: dict[int, dict[str, torch.Tensor]]

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


def load_control(path) -> Control:
    folder = adapter_folder(path)
    tensors, config = load_adapter(folder)
    states = control_state_by_layer(tensors)
    if not states:
        raise CapError(f"{folder / WEIGHTS_NAME}: a LoRA adapter, not a Control Adapter "
                       f"(no *.control_A / *.control_Q keys); use `cap-export merge` or `gguf` for LoRA")
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
    folder = adapter_folder(path)
    tensors, config = load_adapter(folder)
    if control_state_by_layer(tensors):
        raise CapError(f"{folder / WEIGHTS_NAME}: a Control Adapter, not a LoRA; convert it first with "
                       f"`cap-export additive` (or `multiplicative`)")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        m = _LORA_KEY.match(key)
        if m is None:
            raise CapError(f"{folder / WEIGHTS_NAME}: unexpected key {key} (only lora_A / lora_B weights can be exported)")
        pairs.setdefault(m.group(1), {})[m.group(2)] = value
    return Lora(folder, config, {name: (p["A"], p["B"]) for name, p in pairs.items()}, read_provenance(folder))


# ---------------------------------------------------------------- the base model
def model_config(folder: Path) -> tuple[Family, object]:
    """load_hf_config, with a malformed config.json (a list, wrong types, …) as one line."""
    try:
        return load_hf_config(folder)
    except CapError:
        raise
    except Exception as e:  # transformers' config classes raise many kinds (validation, TypeError, …)
        raise CapError(f"{Path(folder) / 'config.json'}: not a usable model config "
                       f"({type(e).__name__}: {' '.join(str(e).split())[:300]})") from None


class Base:
    """A base model folder: family, config and the safetensors index, with the residual writers'
    weight matrices located (their checkpoint names, and for fused experts the slice)."""

    def __init__(self, folder, need_weights: bool = True):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CapError(f"{self.folder}: base model folder not found")
        self.family, self.config = model_config(self.folder)
        self.checkpoint = Checkpoint(self.folder) if need_weights else None

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def files(self) -> dict[str, Path]:
        return self.checkpoint.files

    @cached_property
    def _layer_keys(self) -> list[str]:
        """The decoder layer's own tensor names (relative to model.layers.{i}.), built on meta."""
        with torch.device("meta"):
            layer = self.family.cls("layer")(self.config, 0)
        return list(layer.state_dict().keys())

    @cached_property
    def _writer_keys(self) -> list[str]:
        return writer_keys(self.family, self.config)

    def writer_names(self, layer: int) -> list[str]:
        """Checkpoint-style names of the [H, in] matrices that write into the residual stream in
        decoder layer `layer` (o_proj, down_proj; every expert's w2 for Mixtral)."""
        return [f"model.layers.{layer}.{rel}" for rel in self._writer_keys]

    def locate(self, name: str) -> tuple[str, tuple]:
        """Checkpoint-style tensor name → (the tensor that holds it on disk, index of its part).

        A per-expert name whose checkpoint is fused (transformers v5 layout) maps to the fused
        tensor and the expert's slice; a transformers-v5 module name whose checkpoint keeps the
        older name (e.g. Mixtral's router mlp.gate) maps to that name."""
        if name in self.files:
            return name, WHOLE
        m = _LAYER.match(name)
        if m:
            prefix, rel = f"model.layers.{m.group(1)}.", m.group(2)
            for key in self._layer_keys:
                sources = tensor_sources(self.family, key, self.config)
                for source, index in sources:
                    if source == rel and prefix + key in self.files:          # fused on disk
                        return prefix + key, index
                if key == rel and len(sources) == 1 and sources[0][1] == WHOLE and prefix + sources[0][0] in self.files:
                    return prefix + sources[0][0], WHOLE                      # renamed on disk
        raise CapError(f"{self.checkpoint.where}: no tensor '{name}' in this {self.family.model_type} model "
                       f"(is the adapter for another model?)")

    def shape(self, name: str) -> list[int]:
        """Shape of the (part of the) tensor `name` without reading its data."""
        from safetensors import SafetensorError, safe_open
        stored, index = self.locate(name)
        path = self._file(stored)
        try:
            with safe_open(path, framework="pt") as f:
                shape = f.get_slice(stored).get_shape()
        except (SafetensorError, OSError) as e:
            raise CapError(f"{path}: not a readable safetensors file ({e})") from None
        return list(torch.empty(shape, device="meta")[index].shape)

    def _file(self, stored: str) -> Path:
        path = self.files[stored]
        if not path.is_file():
            raise CapError(f"{self.checkpoint.where}: tensor '{stored}' is listed in '{path.name}', which does not exist")
        return path

    def read_by_file(self, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) for each name, reading one safetensors file at a time (in file order)."""
        from safetensors import SafetensorError, safe_open
        by_file: dict[Path, list[tuple[str, str, tuple]]] = {}
        for name in names:
            stored, index = self.locate(name)
            by_file.setdefault(self._file(stored), []).append((name, stored, index))
        for path in sorted(by_file):
            try:
                with safe_open(path, framework="pt") as f:
                    for name, stored, index in by_file[path]:
                        yield name, (f.get_tensor(stored) if index == WHOLE else f.get_slice(stored)[index])
            except (SafetensorError, OSError) as e:
                raise CapError(f"{path}: not a readable safetensors file ({e})") from None


def writer_keys(family: Family, config) -> list[str]:
    """Residual writer matrices of one decoder layer, as checkpoint names relative to the layer
    (e.g. self_attn.o_proj.weight, mlp.down_proj.weight, block_sparse_moe.experts.{e}.w2.weight).

    A writer module that is an nn.Linear contributes its weight; a fused experts module (Mixtral in
    transformers v5) its `down_proj` [E, H, I], which the checkpoint keeps per expert."""
    with torch.device("meta"):
        layer = family.cls("layer")(config, 0)
    keys = []
    for path in family.writers:
        module = layer.get_submodule(path)
        key = f"{path}.weight" if isinstance(module, nn.Linear) else f"{path}.down_proj"
        keys += [source for source, _ in tensor_sources(family, key, config)]
    return keys


def recorded_base(adapter_config: dict) -> Path | None:
    """The base model folder an adapter records (base_model_name_or_path), when it exists here."""
    recorded = adapter_config.get("base_model_name_or_path")
    return Path(recorded) if recorded and (Path(recorded) / "config.json").is_file() else None


def family_without_base(control_config: dict, hidden_size: int, mixtral_experts: int | None,
                        cohere: bool) -> tuple[Family, object, str]:
    """Family and a config for naming the writers when no base model is given: from the adapter's
    base_model_name_or_path if that folder exists, else from --mixtral N / --cohere, else Llama-like
    names (self_attn.o_proj, mlp.down_proj — the same in every non-MoE family). Returns a note too."""
    import transformers

    if mixtral_experts is not None and mixtral_experts < 1:
        raise CapError(f"--mixtral {mixtral_experts}: the number of experts must be at least 1")
    recorded = recorded_base(control_config)
    if recorded:
        family, config = model_config(recorded)
        return family, config, f"family {family.model_type} from {recorded}/config.json"
    if mixtral_experts:
        config = transformers.AutoConfig.for_model("mixtral", hidden_size=hidden_size, num_local_experts=mixtral_experts,
                                                   num_attention_heads=1, num_key_value_heads=1)
        return family_of("mixtral"), config, f"Mixtral naming with {mixtral_experts} experts (--mixtral)"
    model_type = "cohere" if cohere else "llama"
    config = transformers.AutoConfig.for_model(model_type, hidden_size=hidden_size, num_attention_heads=1,
                                               num_key_value_heads=1)
    return family_of(model_type), config, ("no base model: writers named self_attn.o_proj and mlp.down_proj "
                                          "(pass --base for Mixtral-style models)")


def check_fits(control: Control, base: Base) -> None:
    """The adapter was trained on a model of this shape: hidden size and layer indices."""
    where = control.folder / WEIGHTS_NAME
    if control.hidden_size != base.hidden_size:
        raise CapError(f"{where}: hidden size {control.hidden_size}, but {base.folder}/config.json has hidden_size "
                       f"{base.hidden_size} (adapter and base model do not match)")
    if max(control.layers) >= base.num_layers:
        raise CapError(f"{where}: has layer {max(control.layers)}, but {base.folder}/config.json has "
                       f"{base.num_layers} layers (adapter and base model do not match)")
    recorded = recorded_base(control.config)
    if recorded:
        try:
            raw = json.loads((recorded / "config.json").read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            raw = None
        model_type = raw.get("model_type") if isinstance(raw, dict) else None
        if model_type and model_type != base.family.model_type:
            raise CapError(f"{where}: trained on a {model_type} model ({recorded}), but {base.folder} is "
                           f"{base.family.model_type}")


def check_lora_family(lora: Lora, base: Base) -> None:
    """A LoRA that cap-export made for one model family is not applied to another."""
    made_for = lora.provenance.get("model_type")
    if made_for and made_for != base.family.model_type:
        raise CapError(f"{lora.folder}: made for a {made_for} model ({PROVENANCE}), but {base.folder} is "
                       f"{base.family.model_type}")


def approximation_note(target: str, family: Family) -> str | None:
    """Why the writers form of a 'block' adapter is not exact on this family (None when it is)."""
    if target != "block" or family.block == "parallel":
        return None
    why = ("the MLP reads the attention output before the block's adapter would transform it"
           if family.block == "sequential" else
           "the writers' outputs pass through post-norms, and the MLP reads the attention output first")
    return (f"this adapter was trained on the whole block delta (control_adapter_target 'block'); on a "
            f"{family.model_type} model the exported form is an approximation ({why}). "
            f"`cap-export verify` measures the gap")


# ---------------------------------------------------------------- outputs
def _same(a: Path, b: Path) -> bool:
    if a == b:
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _touches(out: Path, source: Path) -> str | None:
    """How OUT relates to an input: 'is', 'lies inside' or 'contains' it (symlinks, `..` and hard
    links resolved); None when they are apart."""
    out, source = out.resolve(), source.resolve()
    if _same(out, source):
        return "is"
    if any(_same(parent, source) for parent in out.parents):
        return "lies inside"
    if any(_same(parent, out) for parent in source.parents):
        return "contains"
    return None


def check_output(out: Path, force: bool, is_file: bool = False, inputs: dict | None = None) -> None:
    """OUT may be written: it is not an input, inside one or above one (`inputs`: label → path,
    --force or not), and it is absent, an empty folder, or replaceable with --force."""
    out = Path(out)
    for label, source in (inputs or {}).items():
        how = source and _touches(out, Path(source))
        if how:
            raise CapError(f"{out}: OUT {how} the input {label} ({source}); cap-export never writes over or into "
                           f"its inputs, choose another OUT")
    if not out.exists():
        return
    if is_file and out.is_dir():
        raise CapError(f"{out}: is a folder; OUT must be a file path")
    if not is_file and not out.is_dir():
        raise CapError(f"{out}: exists and is not a folder")
    if out.is_dir() and not any(out.iterdir()):
        return
    if not force:
        raise CapError(f"{out}: exists and is not empty (pass --force to replace it)")


@contextlib.contextmanager
def temporary_folder(parent: Path, name: str) -> Iterator[Path]:
    """A new temporary folder for `parent/name` (common.files.make_temp_dir), deleted on exit, also
    on SIGTERM / Ctrl-C; the stale ones that killed processes of this host left are removed first."""
    parent = Path(parent)
    removed = remove_stale_temps(parent, name)
    if removed:
        note(f"removed {len(removed)} temporary folder(s) of {parent / name} left by killed runs: "
             f"{', '.join(p.name for p in removed)}")
    with user_os_errors(parent, "cannot create a temporary folder"):
        tmp = make_temp_dir(parent, name)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def staged_output(out, force: bool, is_file: bool = False, inputs: dict | None = None) -> Iterator[Path]:
    """Yield a temporary path beside OUT (a folder, or a file inside a temporary folder); on success
    it is renamed to OUT, replacing what was there (checked by check_output, with `inputs`); on
    failure or a signal it is removed and OUT is left as it was. An OSError while writing is one line."""
    out = Path(out)
    check_output(out, force, is_file, inputs)
    with temporary_folder(out.parent, out.name) as tmp, user_os_errors(out, "cannot write"):
        yield tmp / out.name if is_file else tmp
        if is_file:
            os.replace(tmp / out.name, out)
            return
        old = None
        if out.exists():
            old = out.parent / temp_name(out.name)        # a stale temporary of OUT if we are killed now
            os.rename(out, old)
        try:
            os.rename(tmp, out)
        except BaseException:
            if old is not None:
                os.rename(old, out)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def folder_size(path: Path) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
