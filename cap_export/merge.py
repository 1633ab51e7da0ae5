"""Merge a LoRA into the base model's weights, writing a full Hugging Face folder.

  additive        M ← M + F·s·B·A          A [r,in], B [out,r]
  multiplicative  M ← M + F·s·B·(A·M)      A [r,out], B [out,r]   (A acts on M's output)
with s the LoRA's own scaling (lora_alpha/r, PEFT's rules) and F = --scale.

Streaming: each shard is copied byte for byte (same name, header, tensor order and dtypes), then
only the tensors a LoRA touches are read — one at a time — updated in float64 a block of rows at a
time, and written back over their own bytes. Memory stays near the largest touched tensor, well
under one shard. The index json is rewritten (sizes recomputed from the headers) and every other
file of the base folder (config, tokenizer, generation config, chat template) is copied.
"""

from __future__ import annotations

import json
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from cap_common.adapters.io import non_finite
from cap_common.errors import CapError
from cap_common.files import os_error_message, write_json
from cap_common.models.loading import INDEX
from cap_export.adapters import Lora
from cap_export.base import Base
from cap_export.compat import check_lora_family, check_lora_modules, check_lora_shapes
from cap_export.folders import PROVENANCE

_CHUNK = 1 << 22  # float64 elements per block of rows (32 MiB)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")


@dataclass
class Edit:
    module: str
    index: tuple
    A: torch.Tensor
    B: torch.Tensor
    factor: float


def merge_mode(lora: Lora, flag: bool) -> tuple[bool, str | None]:
    """Whether to merge multiplicatively: --multiplicative, or the LoRA's own marker."""
    if flag and lora.provenance.get("kind") == "additive":
        raise CapError(f"{lora.folder}: an additive LoRA (made by cap-export additive); drop --multiplicative")
    if lora.marked_multiplicative and not flag:
        return True, "multiplicative LoRA (marked in its adapter_config.json): merging as M ← M + B·(A·M)"
    return flag or lora.marked_multiplicative, None


def plan(base: Base, lora: Lora, multiplicative: bool, scale: float) -> dict[str, list[Edit]]:
    """Stored tensor name → its edits, with every shape checked before anything is written."""
    check_lora_shapes(lora, base, multiplicative, "pass --multiplicative")
    edits: dict[str, list[Edit]] = {}
    for module, (A, B) in lora.pairs.items():
        stored, index = base.locate(module + ".weight")
        edits.setdefault(stored, []).append(Edit(module, index, A, B, scale * lora.scale(module)))
    return edits


def apply_edit(W: torch.Tensor, edit: Edit, multiplicative: bool, where: str = "") -> None:
    """In place on W [out, in] (any float dtype): W += f·B·A, or W += f·B·(A·W); float64 blocks of rows.
    A merged value that is not finite in W's dtype (a NaN in W, an overflow) is a CapError naming `where`."""
    A, B = edit.A.to(torch.float64), edit.factor * edit.B.to(torch.float64)
    step = max(1, _CHUNK // max(1, W.shape[1]))
    rows = [slice(i, i + step) for i in range(0, W.shape[0], step)]
    if multiplicative:
        AW = torch.zeros(A.shape[0], W.shape[1], dtype=torch.float64)
        for r in rows:
            AW += A[:, r] @ W[r].to(torch.float64)
        A = AW
    for r in rows:
        block = (W[r].to(torch.float64) + B[r] @ A).to(W.dtype)
        bad = non_finite(block)
        if bad:
            raise CapError(
                f"{where}: merging {edit.module} gives {bad} in rows {r.start}–{r.start + len(block) - 1} "
                f"(as {str(W.dtype).removeprefix('torch.')}; is the base weight finite?)"
            )
        W[r] = block


def read_header(path: Path) -> tuple[int, dict]:
    """(byte offset of the data section, header dict) of a safetensors file."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CapError(f"{path}: not a readable safetensors file ({e})") from None
    return 8 + n, header


def _patch(src: Path, dst: Path, edits: dict[str, list[Edit]], multiplicative: bool, bar) -> None:
    from safetensors import SafetensorError, safe_open

    start, header = read_header(dst)
    with open(dst, "r+b") as out:
        for stored, todo in edits.items():
            try:
                with safe_open(src, framework="pt") as f:
                    tensor = f.get_tensor(stored)
            except SafetensorError as e:
                raise CapError(f"{src}: cannot read tensor '{stored}' ({e})") from None
            for edit in todo:
                apply_edit(tensor[edit.index], edit, multiplicative, f"{src}: {stored}")
                bar.update()
            data = tensor.contiguous().view(torch.uint8).numpy()
            begin, end = header[stored]["data_offsets"]
            if data.nbytes != end - begin:
                raise RuntimeError(f"{stored}: {data.nbytes} bytes, header says {end - begin}")
            out.seek(start + begin)
            out.write(data.data)
            del tensor, data


def _copy(src: Path, dst: Path) -> None:
    """shutil.copyfile (permissions from the umask, not from BASE); a failure names both files."""
    try:
        shutil.copyfile(src, dst)
    except OSError as e:
        raise CapError(f"cannot copy {os_error_message(e, src)}") from None


def _tensor_bytes(path: Path) -> int:
    _, header = read_header(path)
    return sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__")


def merge(base: Base, lora: Lora, out: Path, multiplicative: bool, scale: float = 1.0, progress: bool = True) -> dict:
    """Write the merged model into the (empty) folder `out`; returns a summary."""
    check_lora_family(lora, base)
    check_lora_modules(lora, base)
    edits = plan(base, lora, multiplicative, scale)
    shards = sorted(set(base.files.values()), key=lambda p: p.name)
    for shard in shards:
        if not shard.is_file():
            raise CapError(f"{base.checkpoint.where}: lists '{shard.name}', which does not exist")
    by_shard: dict[Path, dict[str, list[Edit]]] = {}
    for stored, todo in edits.items():
        by_shard.setdefault(base.files[stored], {})[stored] = todo
    bar = tqdm(total=len(lora.pairs), desc="merge", unit="module", disable=not progress or None)
    for shard in shards:
        read_header(shard)
        _copy(shard, out / shard.name)
        _patch(shard, out / shard.name, by_shard.get(shard, {}), multiplicative, bar)
    bar.close()
    index = base.folder / INDEX
    if index.is_file():
        data = json.loads(index.read_text())
        data.setdefault("metadata", {})["total_size"] = sum(_tensor_bytes(out / s.name) for s in shards)
        write_json(out / INDEX, data)
    copied = []
    for path in sorted(base.folder.iterdir()):
        if path.is_file() and path.name not in (INDEX, PROVENANCE) and not path.name.endswith(_WEIGHT_SUFFIXES):
            _copy(path, out / path.name)
            copied.append(path.name)
    record = {
        "kind": "merged",
        "base": str(base.folder.resolve()),
        "lora": str(lora.folder.resolve()),
        "multiplicative": multiplicative,
        "scale": scale,
        "model_type": base.family.model_type,
        "source": lora.provenance.get("source"),
        "direction": lora.provenance.get("direction", "forward"),
        "lora_kind": lora.provenance.get("kind"),
    }
    write_json(out / PROVENANCE, record)
    return {"shards": len(shards), "tensors": len(edits), "modules": len(lora.pairs), "copied": copied}
