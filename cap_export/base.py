"""The base model an adapter is applied to: its family, config, which file holds each tensor,
and where the residual writers' weight matrices are (per-expert names for Mixtral, fused or not
on disk). Tensors are read one safetensors file at a time, never the whole model.
Every user-facing problem is a one-line CapError naming the file.
"""

from __future__ import annotations

import re
from functools import cached_property
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from cap_common.errors import CapError
from cap_common.models.families import WHOLE, Family, load_hf_config, tensor_sources
from cap_common.models.loading import Checkpoint, meta_decoder_layer

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def model_config(folder: Path) -> tuple[Family, object]:
    """load_hf_config, with a malformed config.json (a list, wrong types, …) as one line."""
    try:
        return load_hf_config(folder)
    except CapError:
        raise
    except Exception as e:  # transformers' config classes raise many kinds (validation, TypeError, …)
        raise CapError(
            f"{Path(folder) / 'config.json'}: not a usable model config "
            f"({type(e).__name__}: {' '.join(str(e).split())[:300]})"
        ) from None


class Base:
    """A base model folder: family, config and the safetensors index, with the residual writers'
    weight matrices located (their checkpoint names, and for fused experts the slice)."""

    def __init__(self, folder, need_weights: bool = True):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CapError(f"{self.folder}: base model folder not found")
        self.family, self.config = model_config(self.folder)
        self.checkpoint = Checkpoint(self.folder) if need_weights else None
        self._headers: dict[Path, dict[str, list[int]]] = {}  # safetensors file → tensor shapes

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
    def _layer_tensors(self) -> dict[str, torch.Tensor]:
        """The decoder layer's own tensors (names relative to model.layers.{i}.), on meta: names and shapes."""
        return meta_decoder_layer(self.family, self.config).state_dict()

    @cached_property
    def _config_shapes(self) -> dict[str, list[int]]:
        """Checkpoint name relative to model.layers.{i}. → shape, from config.json alone (the meta
        layer's tensors, each split into the checkpoint tensors that fill it)."""
        shapes = {}
        for key, t in self._layer_tensors.items():
            shapes[key] = list(t.shape)
            for source, index in tensor_sources(self.family, key, self.config):
                shapes[source] = list(t[index].shape)
        return shapes

    def _config_shape(self, name: str) -> list[int] | None:
        """Shape of `name` by config.json (None: this model has no such tensor); decoder layer
        tensors and lm_head, the weights a LoRA can target."""
        m = _LAYER.match(name)
        if m:
            return self._config_shapes.get(m.group(2)) if int(m.group(1)) < self.num_layers else None
        return [self.config.vocab_size, self.hidden_size] if name == "lm_head.weight" else None

    def has(self, name: str) -> bool:
        """Whether the model holds the checkpoint-style tensor `name` (see `locate`; by config.json
        for a base opened without weights)."""
        if self.checkpoint is None:
            return self._config_shape(name) is not None
        try:
            self.locate(name)
        except CapError:
            return False
        return True

    def writer_names(self, layer: int) -> list[str]:
        """Checkpoint-style names of the [H, in] matrices that write into the residual stream in
        decoder layer `layer` (o_proj, down_proj; every expert's w2 for Mixtral)."""
        return [f"model.layers.{layer}.{rel}" for rel in writer_keys(self.family, self.config, layer)]

    def locate(self, name: str) -> tuple[str, tuple]:
        """Checkpoint-style tensor name → (the tensor that holds it on disk, index of its part).
        A multimodal checkpoint's text-model tensors are found under its own names (language_model.…).

        A per-expert name whose checkpoint is fused (transformers v5 layout) maps to the fused
        tensor and the expert's slice; a transformers-v5 module name whose checkpoint keeps the
        older name (e.g. Mixtral's router mlp.gate) maps to that name."""
        stored = self.checkpoint.actual  # a multimodal checkpoint's own name of a text-model tensor
        for on_disk in (name, stored(name)):  # a stored name (e.g. a vision tower's) is found as it is
            if on_disk in self.files:
                return on_disk, WHOLE
        m = _LAYER.match(name)
        if m:
            prefix, rel = f"model.layers.{m.group(1)}.", m.group(2)
            for key in self._layer_tensors:
                sources = tensor_sources(self.family, key, self.config)
                for source, index in sources:
                    if source == rel and stored(prefix + key) in self.files:  # fused on disk
                        return stored(prefix + key), index
                if (
                    key == rel
                    and len(sources) == 1
                    and sources[0][1] == WHOLE
                    and stored(prefix + sources[0][0]) in self.files
                ):
                    return stored(prefix + sources[0][0]), WHOLE  # renamed on disk
        raise CapError(
            f"{self.checkpoint.where}: no tensor '{name}' in this {self.family.model_type} model "
            f"(is the adapter for another model?)"
        )

    def shape(self, name: str) -> list[int]:
        """Shape of the (part of the) tensor `name` without reading its data: from its safetensors
        header, or by config.json for a base opened without weights."""
        from safetensors import SafetensorError, safe_open

        if self.checkpoint is None:
            shape = self._config_shape(name)
            if shape is None:
                raise CapError(
                    f"{self.folder}/config.json: no tensor '{name}' in this {self.family.model_type} model "
                    f"({self.num_layers} layers)"
                )
            return shape
        stored, index = self.locate(name)
        path = self._file(stored)
        if path not in self._headers:  # every tensor's shape in the file, from its header, read once
            try:
                with safe_open(path, framework="pt") as f:
                    self._headers[path] = {key: f.get_slice(key).get_shape() for key in f.keys()}
            except (SafetensorError, OSError) as e:
                raise CapError(f"{path}: not a readable safetensors file ({e})") from None
        if stored not in self._headers[path]:
            raise CapError(f"{path}: no tensor '{stored}', which {self.checkpoint.where.name} places there")
        return list(torch.empty(self._headers[path][stored], device="meta")[index].shape)

    def _file(self, stored: str) -> Path:
        path = self.files[stored]
        if not path.is_file():
            raise CapError(
                f"{self.checkpoint.where}: tensor '{stored}' is listed in '{path.name}', which does not exist"
            )
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


def writer_keys(family: Family, config, layer: int = 0) -> list[str]:
    """Residual writer matrices of decoder layer `layer`, as checkpoint names relative to the layer
    (e.g. self_attn.o_proj.weight, mlp.down_proj.weight, block_sparse_moe.experts.{e}.w2.weight).

    A writer module that is an nn.Linear contributes its weight; a fused experts module (Mixtral in
    transformers v5) its `down_proj` [E, H, I], which the checkpoint keeps per expert. A model whose
    MoE layers alternate with dense ones has the writers of each layer's kind."""
    from cap_common.models.pipeline import layer_writers

    module_layer = meta_decoder_layer(family, config, layer)
    keys = []
    for path in layer_writers(family, module_layer):
        module = module_layer.get_submodule(path)
        if hasattr(module, "down_proj_bias"):
            where = Path(getattr(config, "_name_or_path", "") or ".") / "config.json"
            raise CapError(
                f"{where}: model_type {family.model_type}: its experts keep their down projections as [E, in, H] "
                "with biases, which "
                "cap-export cannot rewrite yet; a control adapter on this model is not exportable (LoRA and "
                "full fine-tunes are)"
            )
        key = f"{path}.weight" if isinstance(module, nn.Linear) else f"{path}.down_proj"
        keys += [source for source, _ in tensor_sources(family, key, config)]
    return keys
