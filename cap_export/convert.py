"""Control Adapter → LoRA on the residual writers, exactly, from the factors (docs/math.md, sections 3–4).

A writer M [H, in] (o_proj, down_proj, each Mixtral expert's w2) writes M·x into the residual
stream. The adapter as trained on the writers turns that into (I + W')·M·x, with W' = U·V
(U [H,k], V [k,H], k = r or 2r; `Control.factors`). Two exact ways to store it:

  multiplicative   lora_B = U [H,k], lora_A = V [k,H]:  M ← M + B·(A·M)   (A acts on M's output)
  additive         lora_B = U [H,k], lora_A = V·M [k,in]: M ← M + B·A      (plain PEFT LoRA, scaling 1)

No H×H or H×in matrix is ever formed; V·M is a k-row product read one shard at a time, in float64.
`rank` truncates each (U, V·M) by thin_svd_truncate (QR of each factor + SVD of a k×k core), which
is the best rank-R approximation of ΔM = U·V·M (Eckart–Young).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import torch
from tqdm import tqdm

from cap_common.adapters.factors import thin_svd_truncate
from cap_common.adapters.io import lora_key, non_finite, save_adapter
from cap_common.dtypes import torch_dtype
from cap_common.errors import CapError
from cap_common.files import write_json
from cap_export.adapters import Control
from cap_export.base import Base
from cap_export.folders import PROVENANCE
from cap_export.staging import staged_output

_CHUNK = 1 << 22  # float64 elements converted at once when multiplying by a weight (32 MiB)


@dataclass
class Converted:
    tensors: dict[str, torch.Tensor]
    config: dict  # adapter_config.json (PEFT LoraConfig-shaped)
    provenance: dict  # cap_export.json: what it was made from
    modules: int
    rank: int


def lora_config(ranks: dict[str, int], layers: list[int], base_path: str, **extra) -> dict:
    """A PEFT LoraConfig with scaling 1 on every module (lora_alpha = r; where a module's rank
    differs, rank_pattern and alpha_pattern give it alpha = its own rank)."""
    r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {re.escape(name): rank for name, rank in sorted(ranks.items()) if rank != r}
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_path,
        "r": r,
        "lora_alpha": r,
        "lora_dropout": 0.0,
        "use_rslora": False,
        "target_modules": sorted({name.rsplit(".", 1)[-1] for name in ranks}),
        "layers_to_transform": sorted(layers),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        **extra,
    }
    if pattern:
        config["rank_pattern"], config["alpha_pattern"] = pattern, dict(pattern)
    return config


def _on_text_model(tensors: dict, config: dict, ranks: dict[str, int]) -> tuple[dict, dict]:
    """A LoRA for a multimodal model's text model, as PEFT names its modules (model.language_model.…):
    the keys renamed, and target_modules the exact module names (a regex), so that PEFT wraps no module
    of the vision tower that has the same last name (o_proj, down_proj)."""
    from cap_common.models.loading import MODULE_TEXT_PREFIX, actual_name

    text = {name: actual_name(MODULE_TEXT_PREFIX, name) for name in ranks}
    peft = "base_model.model."
    tensors = {peft + actual_name(MODULE_TEXT_PREFIX, k.removeprefix(peft)): t for k, t in tensors.items()}
    config = dict(config, target_modules="|".join(re.escape(text[n]) for n in sorted(ranks)), layers_to_transform=None)
    for key in ("rank_pattern", "alpha_pattern"):
        if key in config:
            config[key] = {re.escape(text[n]): r for n, r in sorted(ranks.items()) if re.escape(n) in config[key]}
    return tensors, config


def layer_and_path(name: str) -> tuple[int, str]:
    """model.layers.{i}.<path>.weight → (i, <path>)."""
    m = re.match(r"^model\.layers\.(\d+)\.(.+)\.weight$", name)
    return int(m.group(1)), m.group(2)


def _stored(t: torch.Tensor, dtype: str, key: str, control: Control) -> torch.Tensor:
    """t cast to the saved dtype; a value that is not finite there (float16 overflows past 65504) is refused."""
    out = t.to(torch_dtype(dtype)).contiguous()
    bad = non_finite(out)
    if bad:
        hint = "; float16 overflows above 65504, use --dtype float32 or bfloat16" if dtype == "float16" else ""
        raise CapError(f"{control.folder}: converted {key} in {dtype} holds {bad}{hint}")
    return out


def _provenance(kind: str, control: Control, direction: str, rank, dtype: str, family, base=None) -> dict:
    return {
        "kind": kind,
        "source": str(control.folder.resolve()),
        "base": str(base) if base else None,
        "model_type": family,
        "control_adapter_type": control.adapter_type,
        "control_adapter_target": control.target,
        "direction": direction,
        "rank": rank,
        "dtype": dtype,
    }


def multiplicative(
    control: Control,
    writer_keys: Callable[[int], list[str]],
    model_type: str | None,
    direction: str = "forward",
    dtype: str = "float32",
    base_path: str = "",
    progress: bool = True,
) -> Converted:
    """Multiplicative LoRA: on every writer of every adapted layer, lora_A = V [k,H], lora_B = U [H,k].

    writer_keys(layer): the writers' checkpoint names relative to that layer (cap_export.base.writer_keys). The
    adapter_config carries "multiplicative": true so that `merge` applies M ← M + B·(A·M).
    model_type: the family it was made for, or None (no base model): cap_export.json then records
    only the modules and the hidden size, and `merge` takes any base model that has them."""
    tensors, ranks, modules = {}, {}, {}
    for layer in tqdm(control.layers, desc="multiplicative", unit="layer", disable=not progress or None):
        U, V = control.factors(layer, direction)
        for key in writer_keys(layer):
            modules[key.removesuffix(".weight")] = None
            path = key.removesuffix(".weight")
            for name, t in (("A", V), ("B", U)):
                key = lora_key(layer, path, name)
                tensors[key] = _stored(t, dtype, key, control)
            ranks[f"model.layers.{layer}.{path}"] = U.shape[1]
    config = lora_config(
        ranks, control.layers, base_path or control.config.get("base_model_name_or_path", ""), multiplicative=True
    )
    provenance = _provenance("multiplicative", control, direction, None, dtype, model_type)
    provenance["modules"] = list(modules)
    provenance["hidden_size"] = control.hidden_size
    return Converted(tensors, config, provenance, len(ranks), config["r"])


def left_multiply(V: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """V·M in V's dtype (float64), converting M [H, in] a block of rows at a time: Σ V[:, rows]·M[rows]."""
    step = max(1, _CHUNK // max(1, M.shape[1]))
    out = torch.zeros(V.shape[0], M.shape[1], dtype=V.dtype)
    for start in range(0, M.shape[0], step):
        out += V[:, start : start + step] @ M[start : start + step].to(V.dtype)
    return out


def additive(
    control: Control,
    base: Base,
    direction: str = "forward",
    rank: int | None = None,
    dtype: str = "float32",
    progress: bool = True,
) -> Converted:
    """Additive PEFT LoRA: per writer M, lora_B = U, lora_A = V·M (scaling 1), exact at rank k;
    with `rank`, the best rank-R approximation of U·V·M from the factors."""
    if rank is not None and rank < 1:
        raise CapError(f"--rank {rank}: must be at least 1")
    names = [name for layer in control.layers for name in base.writer_names(layer)]
    for name in names:
        shape = base.shape(name)
        if shape[0] != control.hidden_size:
            raise CapError(
                f"{base.folder}: writer {name} has shape {shape}; expected [{control.hidden_size}, in] "
                f"(output = hidden size)"
            )
    layer_factors = {layer: control.factors(layer, direction) for layer in control.layers}
    tensors, ranks = {}, {}
    bar = tqdm(total=len(names), desc="additive", unit="matrix", disable=not progress or None)
    for name, M in base.read_by_file(names):
        layer, path = layer_and_path(name)
        bad = non_finite(M)
        if bad:
            raise CapError(f"{base.files[base.locate(name)[0]]}: base weight {name} holds {bad}")
        U, V = layer_factors[layer]
        VM = left_multiply(V, M)
        B, A = thin_svd_truncate(U, VM, rank) if rank is not None else (U, VM)
        for part, t in (("A", A), ("B", B)):
            key = lora_key(layer, path, part)
            tensors[key] = _stored(t, dtype, key, control)
        ranks[name.removesuffix(".weight")] = B.shape[1]
        bar.update()
    bar.close()
    config = lora_config(ranks, control.layers, str(base.folder.resolve()))
    if base.checkpoint.text_prefix:
        tensors, config = _on_text_model(tensors, config, ranks)
    provenance = _provenance("additive", control, direction, rank, dtype, base.family.model_type, base.folder.resolve())
    return Converted(tensors, config, provenance, len(ranks), config["r"])


def save(converted: Converted, out, force: bool = False, inputs: dict | None = None) -> None:
    """Write OUT: adapter_model.safetensors + adapter_config.json + cap_export.json, all or nothing
    (OUT checked against `inputs` by staged_output)."""
    with staged_output(out, force, inputs=inputs) as tmp:
        save_adapter(tmp, converted.tensors, converted.config)
        write_json(tmp / PROVENANCE, converted.provenance, sort_keys=True)
