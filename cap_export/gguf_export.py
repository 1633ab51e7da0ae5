"""A PEFT LoRA → GGUF LoRA adapter for llama.cpp (`llama-server --lora FILE`), with the gguf package.

What llama.cpp's adapter loader checks, and what this writes:
- general.architecture = the base model's llama.cpp architecture, general.type = "adapter",
  adapter.type = "lora", adapter.lora.alpha = α (llama.cpp scales each pair by α / rank).
- per target weight `<gguf name>.weight`, tensors `<gguf name>.weight.lora_a` with shape [r, in]
  and `.lora_b` with shape [out, r] (GGUF lists dimensions reversed: ne = [in, r] and [r, out]).
  Names come from gguf's own tables (`gguf.get_tensor_name_map`): e.g. blk.3.attn_output,
  blk.3.ffn_down, blk.3.attn_q. Per-expert LoRAs (Mixtral's experts.{e}.w2) are stacked into
  one 3-D pair per layer (blk.3.ffn_down_exps: lora_a [E, r, in], lora_b [E, out, r]).
- llama.cpp's converter reorders the rows of llama-architecture q_proj / k_proj weights for its
  rotary layout; the same row permutation is applied to lora_b of those modules (lora_a is
  unchanged: the permutation acts on output rows only).
- Each module's PEFT scaling s is kept: llama.cpp computes α/r per pair, so where s·r ≠ α, lora_b
  is multiplied by s·r/α.
- Tensor types f32, f16, bf16 and q8_0 (what llama.cpp's convert_lora_to_gguf.py offers), encoded
  with gguf.quants.quantize. Q8_0 packs blocks of 32 values along a row; a tensor whose rows are
  not a multiple of 32 long (lora_b [out, r] for r = 8, 16, …) is stored as f16, as llama.cpp's
  converter does.
Multiplicative LoRAs are refused: llama.cpp only adds B·A to a weight. Marked ones by their marker,
qlora-pipe-lite's unmarked ones by their shapes: every pair must fit its base weight [out, in] as
lora_A [r, in], lora_B [out, r] (by BASE's config.json; compat.check_lora_shapes).
"""

from __future__ import annotations

import re
from collections import defaultdict

import gguf
import numpy as np
import torch
from tqdm import tqdm

from cap_common.adapters.io import non_finite
from cap_common.errors import CapError
from cap_export.adapters import Lora
from cap_export.base import Base
from cap_export.compat import check_lora_family, check_lora_shapes

# model_type → (llama.cpp architecture, whether its converter permutes q/k rows for rotary).
# Mistral and Mixtral convert as llama.cpp's "llama" architecture.
ARCHITECTURES = {
    "llama": (gguf.MODEL_ARCH.LLAMA, True),
    "mistral": (gguf.MODEL_ARCH.LLAMA, True),
    "mixtral": (gguf.MODEL_ARCH.LLAMA, True),
    "qwen2": (gguf.MODEL_ARCH.QWEN2, False),
    "qwen3": (gguf.MODEL_ARCH.QWEN3, False),
    "cohere": (gguf.MODEL_ARCH.COMMAND_R, False),
    "cohere2": (gguf.MODEL_ARCH.COHERE2, False),
    "gemma2": (gguf.MODEL_ARCH.GEMMA2, False),
    "phi3": (gguf.MODEL_ARCH.PHI3, False),
    # llama.cpp's converters for SmolLM3 and Granite derive from its Llama one (q/k rows permuted)
    "gemma3_text": (gguf.MODEL_ARCH.GEMMA3, False),
    "qwen3_moe": (gguf.MODEL_ARCH.QWEN3MOE, False),
    "glm4": (gguf.MODEL_ARCH.GLM4, False),
    "olmo2": (gguf.MODEL_ARCH.OLMO2, False),
    "smollm3": (gguf.MODEL_ARCH.SMOLLM3, True),
    "granite": (gguf.MODEL_ARCH.GRANITE, True),
    "granitemoe": (gguf.MODEL_ARCH.GRANITE_MOE, True),
}
Q = gguf.GGMLQuantizationType
OUTTYPES = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}
_EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.([^.]+)$")
ADDITIVE_ONLY = (
    "llama.cpp only adds B·A to a weight; convert the Control Adapter with `cap-export additive BASE CKPT OUT` "
    "and export that, or merge this LoRA with `cap-export merge BASE LORA OUT --multiplicative`"
)


def rotary_permute(rows: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's q/k row order: per head of D rows, row 2j + t ← row t·D/2 + j (t ∈ {0,1}),
    i.e. the two rotary halves interleaved. rows: [n_head·D, ...]."""
    return rows.reshape(n_head, 2, rows.shape[0] // n_head // 2, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)


def _heads(module: str, config) -> int | None:
    """Heads whose rotary rows llama.cpp permutes, for a q_proj / k_proj module; else None."""
    leaf = module.rsplit(".", 1)[-1]
    if leaf == "q_proj":
        return config.num_attention_heads
    if leaf == "k_proj":
        return getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return None


def gguf_tensors(lora: Lora, base: Base) -> tuple[str, float, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """(architecture name, α, {gguf weight name: (lora_a, lora_b)}) in float32, ready to write."""
    if base.family.model_type not in ARCHITECTURES:
        raise CapError(
            f"{base.folder}: no llama.cpp architecture known for model_type '{base.family.model_type}' "
            f"(cap-export gguf writes adapters for: {', '.join(ARCHITECTURES)})"
        )
    arch, permute = ARCHITECTURES[base.family.model_type]
    names = gguf.get_tensor_name_map(arch, base.num_layers)
    alpha = float(lora.config.get("lora_alpha") or next(iter(lora.pairs.values()))[0].shape[0])

    def gguf_name(hf_name: str) -> str:
        name = names.get_name(hf_name, try_suffixes=(".weight",))
        if name is None:
            raise CapError(
                f"{lora.folder}: no llama.cpp tensor for '{hf_name}' ({gguf.MODEL_ARCH_NAMES[arch]} architecture)"
            )
        return name

    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    experts: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = defaultdict(dict)
    for module, (A, B) in lora.pairs.items():
        A, B = A.to(torch.float32), B.to(torch.float32)
        fold = lora.scale(module) * A.shape[0] / alpha
        if fold != 1.0:
            B = B * fold
        heads = _heads(module, base.config) if permute else None
        if heads:
            B = rotary_permute(B, heads)
        m = _EXPERT.match(module)
        if m:
            experts[f"{m.group(1)}.{m.group(3)}"][int(m.group(2))] = (A, B)
        else:
            out[gguf_name(module + ".weight")] = (A, B)
    for stacked, by_expert in experts.items():
        count = getattr(base.config, "num_local_experts", None) or len(by_expert)
        if sorted(by_expert) != list(range(count)):
            raise CapError(
                f"{lora.folder}: {stacked}: LoRA pairs for experts {sorted(by_expert)}; llama.cpp needs "
                f"all {count} (experts are stored stacked)"
            )
        pairs = [by_expert[e] for e in range(count)]
        if len({a.shape for a, _ in pairs}) != 1:
            raise CapError(f"{lora.folder}: {stacked}: experts have different LoRA ranks (llama.cpp stacks them)")
        out[gguf_name(stacked + ".weight")] = (torch.stack([a for a, _ in pairs]), torch.stack([b for _, b in pairs]))
    return gguf.MODEL_ARCH_NAMES[arch], alpha, out


def encode(t: torch.Tensor, outtype: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """(data for GGUFWriter.add_tensor, its GGML type): `t` in the --outtype, or f16 where q8_0's
    32-value blocks do not fit the rows (gguf.QuantError, llama.cpp's converter falls back the same way)."""
    qtype = OUTTYPES[outtype]
    array = np.ascontiguousarray(t.to(torch.float32).numpy())
    try:
        return gguf.quants.quantize(array, qtype), qtype
    except gguf.QuantError:
        return gguf.quants.quantize(array, Q.F16), Q.F16


def export_gguf(lora: Lora, base: Base, path, outtype: str = "f32", progress: bool = True) -> dict:
    """Write the GGUF adapter file `path`; returns a summary (`f16_fallback`: tensors q8_0 could not pack)."""
    if lora.marked_multiplicative:
        raise CapError(f"{lora.folder}: a multiplicative LoRA (marked so by cap-export): {ADDITIVE_ONLY}")
    check_lora_family(lora, base)
    check_lora_shapes(lora, base, False, ADDITIVE_ONLY)
    arch, alpha, tensors = gguf_tensors(lora, base)
    arrays, fallback = {}, 0
    for name, (A, B) in tqdm(sorted(tensors.items()), desc="gguf", unit="module", disable=not progress or None):
        for suffix, t in (("lora_a", A), ("lora_b", B)):
            data, qtype = encode(t, outtype)
            fallback += qtype != OUTTYPES[outtype]
            bad = non_finite(torch.from_numpy(np.asarray(gguf.quants.dequantize(data, qtype), dtype=np.float32)))
            if bad:
                stored = qtype.name.lower()
                hint = "; f16 overflows above 65504, use --outtype f32" if stored in ("f16", "q8_0") else ""
                raise CapError(f"{lora.folder}: GGUF tensor {name}.{suffix} in {stored} holds {bad}{hint}")
            arrays[f"{name}.{suffix}"] = (data, qtype)
    writer = gguf.GGUFWriter(str(path), arch=arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    for name, (data, qtype) in arrays.items():
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()
    return {"architecture": arch, "alpha": alpha, "tensors": 2 * len(tensors), "f16_fallback": fallback}
