"""Layer-wise loading: build one module at a time and read only its tensors from the safetensors.

Each module is created on the meta device (no allocation, no random init), materialized empty on
the host in the target dtype, filled tensor by tensor (one `safe_open` per tensor, so no file stays
mapped), quantized to 4-bit if asked, and then moved to its device before the next one is built:
host memory stays near one layer, never the model.

Errors in the folder (no safetensors, a shard the index names but that is missing, a missing
tensor, a wrong shape) are one-line CapErrors naming the file and the tensor.
"""

from __future__ import annotations

import ctypes
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from cap_common.errors import CapError
from cap_common.models.families import WHOLE, Family, Source, load_hf_config, tensor_sources

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


# Where multimodal checkpoints keep their text model: `language_model.model.…` + `language_model.lm_head`
# (the hub's and save_pretrained's names), or `model.language_model.…` + `lm_head` (transformers v5's modules).
MODULE_TEXT_PREFIX = "model.language_model."  # also how PEFT names a multimodal model's text modules
TEXT_PREFIXES = ("language_model.", MODULE_TEXT_PREFIX)


def actual_name(prefix: str, name: str) -> str:
    """A text-model tensor name (model.X, lm_head.weight) as a checkpoint with the text prefix names it."""
    if prefix == "language_model.":
        return prefix + name
    if prefix == "model.language_model." and name.startswith("model."):
        return prefix + name[len("model.") :]
    return name


def text_prefix(names) -> str:
    """The prefix under which a checkpoint with these tensor names keeps its text model ("" for a text model)."""
    embed = "model.embed_tokens.weight"
    return next((p for p in TEXT_PREFIXES if embed not in names and actual_name(p, embed) in names), "")


def text_name(prefix: str, name: str) -> str | None:
    """Inverse of actual_name: the text-model name of a checkpoint tensor (None: not the text model's)."""
    if not prefix:
        return name
    if prefix == "language_model.":
        return name[len(prefix) :] if name.startswith(prefix) else None
    if name.startswith(prefix):
        return "model." + name[len(prefix) :]
    return name if name == "lm_head.weight" else None


class Checkpoint:
    """The safetensors files of a model folder and which file holds each tensor."""

    def __init__(self, model_dir: Path):
        self.model_dir = Path(model_dir)
        index, single = self.model_dir / INDEX, self.model_dir / SINGLE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
                raise CapError(f"{index}: not a valid safetensors index ({e!r})") from None
            self.where = index
            self.files = {name: self.model_dir / file for name, file in weight_map.items()}
        elif single.is_file():
            self.where = single
            self.files = dict.fromkeys(self._keys(single), single)
        else:
            raise CapError(f"{self.model_dir}: no {SINGLE} or {INDEX} (cap loads safetensors checkpoints only)")
        # A multimodal checkpoint holds its text model under a prefix; cap names its tensors as a text
        # model's (model.…, lm_head.weight) and reads and writes them under the checkpoint's own names.
        self.text_prefix = text_prefix(self.files)

    @staticmethod
    def _keys(path: Path) -> list[str]:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(path, framework="pt") as f:
                return list(f.keys())
        except (SafetensorError, OSError) as e:
            raise CapError(f"{path}: not a readable safetensors file ({e})") from None

    def actual(self, name: str) -> str:
        """The checkpoint's own name of the text-model tensor `name` (model.…, lm_head.weight)."""
        return actual_name(self.text_prefix, name)

    def __contains__(self, name: str) -> bool:
        return self.actual(name) in self.files

    def read(self, name: str, what: str = "") -> torch.Tensor:
        """The tensor `name` (a text-model name), read alone from its file (the file is closed again at once)."""
        from safetensors import SafetensorError, safe_open

        name = self.actual(name)
        path = self.files.get(name)
        if path is None and f"{name}_blocks" in self.files:
            raise CapError(
                f"{self.where}: tensor '{name}' is MXFP4-quantized ({name}_blocks, _scales); cap loads bf16 or "
                "float32 weights: dequantize the checkpoint first (transformers: from_pretrained with "
                "Mxfp4Config(dequantize=True), then save_pretrained)"
            )
        if f"{name}_scale_inv" in self.files:
            raise CapError(
                f"{self.where}: tensor '{name}' is fp8 with block scales ({name}_scale_inv); cap loads bf16 or "
                "float32 weights: dequantize the checkpoint first (e.g. DeepSeek's fp8_cast_bf16.py)"
            )
        if path is None:
            raise CapError(f"{self.where}: tensor '{name}' is missing{what}")
        if not path.is_file():
            raise CapError(f"{self.where}: tensor '{name}' is listed in '{path.name}', which does not exist")
        try:
            with safe_open(path, framework="pt") as f:
                return f.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise CapError(f"{path}: cannot read tensor '{name}' ({e})") from None


@dataclass
class ModelSource:
    """Everything the builders need to know about a model folder, read once (config + index only)."""

    model_dir: Path
    family: Family
    config: object  # the transformers config, attention implementation set
    checkpoint: Checkpoint

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers


def open_model(model_dir: Path) -> ModelSource:
    family, config = load_hf_config(Path(model_dir))
    return ModelSource(Path(model_dir), family, config, Checkpoint(model_dir))


def meta_decoder_layer(family: Family, config, index: int = 0) -> nn.Module:
    """transformers decoder layer `index` on the meta device: its modules, tensor names and shapes,
    with no storage and no random init."""
    with torch.device("meta"):
        return family.cls("layer")(config, index)


def empty_module(factory: Callable[[], nn.Module], dtype: torch.dtype) -> nn.Module:
    """factory() built on the meta device, then given uninitialized host storage in `dtype`."""
    with torch.device("meta"):
        module = factory()
    return module.to(dtype).to_empty(device="cpu")


def fill(
    module: nn.Module,
    checkpoint: Checkpoint,
    prefix: str,
    sources: Callable[[str], list[Source]] = lambda key: [(key, WHOLE)],
    what: str = "",
) -> None:
    """Copy every parameter and persistent buffer of `module` from the checkpoint.

    Module tensor `key` is filled from the checkpoint tensors `prefix + name` for (name, index) in
    sources(key), each into the part `index` of it (a whole tensor, or e.g. one expert's slice).
    """
    with torch.no_grad():
        for key, tensor in module.state_dict(keep_vars=True).items():
            for name, index in sources(key):
                full = prefix + name
                value = checkpoint.read(full, what)
                target = tensor.data[index]
                if value.shape != target.shape:
                    full = checkpoint.actual(full)
                    raise CapError(
                        f"{checkpoint.files[full]}: tensor '{full}' has shape {list(value.shape)}, "
                        f"expected {list(target.shape)} from {checkpoint.model_dir / 'config.json'}"
                    )
                target.copy_(value)


# ---------------------------------------------------------------- the model's parts
def load_embedding(source: ModelSource, dtype: torch.dtype) -> nn.Embedding:
    c = source.config
    embed = empty_module(lambda: nn.Embedding(c.vocab_size, c.hidden_size, getattr(c, "pad_token_id", None)), dtype)
    fill(embed, source.checkpoint, "model.embed_tokens.")
    return embed


def load_decoder_layer(source: ModelSource, index: int, dtype: torch.dtype, quantize: bool = False) -> nn.Module:
    """transformers decoder layer `index` of the model, on the host (4-bit layers still unquantized:
    moving them to a device quantizes them)."""
    family, config = source.family, source.config
    layer = empty_module(lambda: meta_decoder_layer(family, config, index), dtype)
    for name in family.fp32_modules:  # e.g. DeepSeek's router and its bias, as transformers keeps them
        if name in dict(layer.named_modules()):
            layer.get_submodule(name).float()
    fill(
        layer,
        source.checkpoint,
        f"model.layers.{index}.",
        lambda key: tensor_sources(family, key, config),
        what=f" (layer {index} of this {family.model_type} model)",
    )
    if quantize:
        parent, _, leaf = (family.fused_experts or "").rpartition(".")
        owner = layer.get_submodule(parent) if family.fused_experts else None
        if hasattr(owner, leaf):  # a dense layer of an MoE model has none
            setattr(owner, leaf, Experts4bit(getattr(owner, leaf)))
        quantize_4bit(layer, keep=family.keep_unquantized)
    return layer


def load_final_norm(source: ModelSource, dtype: torch.dtype) -> nn.Module:
    family, c = source.family, source.config
    norm = empty_module(lambda: family.cls("norm")(c.hidden_size, eps=getattr(c, family.norm_eps)), dtype)
    fill(norm, source.checkpoint, "model.norm.")
    return norm


def load_lm_head(source: ModelSource, dtype: torch.dtype) -> nn.Linear:
    """The LM head; with tied embeddings it is loaded from the embedding weight (unless the checkpoint
    has a head of its own: transformers does not tie those either)."""
    c = source.config
    head = empty_module(lambda: nn.Linear(c.hidden_size, c.vocab_size, bias=False), dtype)
    tied = getattr(c, "tie_word_embeddings", False) and "lm_head.weight" not in source.checkpoint
    fill(head, source.checkpoint, "model.embed_tokens." if tied else "lm_head.")
    return head


def rotary_embedding(source: ModelSource) -> nn.Module:
    """The family's rotary module (fp32 inv_freq computed from the config; small)."""
    return source.family.cls("rotary")(config=source.config)


def release_host_memory() -> None:
    """Hand freed host memory back to the OS (glibc keeps freed blocks below its dynamic mmap
    threshold, up to 32 MB, in the heap: without this a layer moved to the GPU can stay resident)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


# ---------------------------------------------------------------- 4-bit
class Experts4bit(nn.Module):
    """MoE experts (transformers v5 fused layout: gate_up_proj [E, 2I, H], down_proj [E, H, I]) with
    each expert's two projections as 4-bit linears, since bitsandbytes cannot quantize 3-D
    parameters. Same routing and numerics as transformers' eager experts loop:

        out[t] = Σ_{k} w[t,k] · down_e(act(gate_e(x_t)) · up_e(x_t)),   e = top_k_index[t,k]
    """

    def __init__(self, experts: nn.Module, compute_dtype: torch.dtype = torch.bfloat16):
        from cap_common.models.nf4 import linear4bit

        super().__init__()
        self.num_experts = experts.gate_up_proj.shape[0]
        self.act_fn = experts.act_fn
        # Views into the fused tensors: quantizing replaces them, so no second copy is made.
        self.gate_up = nn.ModuleList(linear4bit(w, None, compute_dtype) for w in experts.gate_up_proj.data.unbind(0))
        self.down = nn.ModuleList(linear4bit(w, None, compute_dtype) for w in experts.down_proj.data.unbind(0))

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """hidden_states [N,H], top_k_index / top_k_weights [N,K] → [N,H]."""
        out = torch.zeros_like(hidden_states)
        for e in top_k_index.unique().tolist():
            token, k = torch.where(top_k_index == e)
            gate, up = self.gate_up[e](hidden_states[token]).chunk(2, dim=-1)
            y = self.down[e](self.act_fn(gate) * up) * top_k_weights[token, k, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out


def quantize_4bit(
    module: nn.Module, keep: tuple[str, ...] = (), compute_dtype: torch.dtype = torch.bfloat16
) -> list[str]:
    """Replace every nn.Linear in `module` (except those under a name in `keep`) by a 4-bit linear
    (common/models/nf4.py: nf4, double quantization, `compute_dtype` compute). The weights are
    quantized when the module is next moved with .to(device). Returns the replaced names."""
    from cap_common.models.nf4 import Linear4bit, linear4bit

    replaced = []
    for name, child in list(module.named_modules()):
        if not isinstance(child, nn.Linear) or isinstance(child, Linear4bit):
            continue
        if any(name == k or name.startswith(k + ".") for k in keep):
            continue
        bias = None if child.bias is None else child.bias.data
        q = linear4bit(child.weight.data, bias, compute_dtype)
        parent, _, leaf = name.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, leaf, q)
        replaced.append(name)
    return replaced
