"""What a checkpoint holds, by name and in safetensors + JSON only — so it loads on any topology
and can be read without unpickling anything.

    trainable-stage<s>.safetensors   written by data-parallel rank 0 of stage s, for every trainable
                                     parameter NAME of the stage (DeepSpeed names parameters by their
                                     global pipeline position, `3.layer.self_attn.o_proj.lora_A.weight`,
                                     whatever the stage count):
                                       NAME                 the weight
                                       NAME#exp_avg         Adam's first moment m
                                       NAME#exp_avg_sq      Adam's second moment v
                                       NAME#kahan_comp      Kahan compensation (bf16 parameters only)
                                     metadata "optimizer": JSON of the param group's scalar state
                                     (its step count t and torch-optimi's set-up flags)
    rng-rank<r>.safetensors          rank r's torch (and CUDA) RNG states as uint8 tensors, numpy's
                                     MT19937 key as int64; numpy's and Python's scalars in metadata

A resume gives every rank the tensors of its own parameters, found by name in whichever part holds
them (`load_trainable`), so stages may be re-cut and data-parallel replicas added or removed. The
RNG files are restored only on the topology that wrote them (dropout masks are drawn per rank).
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cap_common.errors import CapError

STATE_KEYS = ("exp_avg", "exp_avg_sq", "kahan_comp")
GROUP_KEYS = ("step", "setup", "kahan_sum", "triton", "foreach")  # scalar state torch-optimi keeps per group


def part_name(stage: int) -> str:
    return f"trainable-stage{stage}.safetensors"


def _save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def save_trainable(path: Path, params: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer) -> None:
    """Weights and Adam state of `params` (name → parameter, all in `optimizer`'s one group)."""
    tensors = {}
    for name, p in params.items():
        tensors[name] = p
        state = optimizer.state.get(p, {})
        for key in STATE_KEYS:
            value = state.get(key)
            if isinstance(value, torch.Tensor) and value.shape == p.shape:
                tensors[f"{name}#{key}"] = value
    group = optimizer.param_groups[0]
    scalars = {k: (int(group[k]) if isinstance(group.get(k), torch.Tensor) else group.get(k)) for k in GROUP_KEYS}
    _save(tensors, path, {"format": "cap-trainable-1", "optimizer": json.dumps(scalars)})


def load_trainable(
    folder: Path, params: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer, device: torch.device
) -> None:
    """Set `params` and their optimizer state from the checkpoint's parts; CapError naming the first
    parameter no part holds (or holds with another shape)."""
    found: dict[str, torch.Tensor] = {}
    scalars = None
    for part in sorted(folder.glob("trainable-stage*.safetensors")):
        with safe_open(str(part), framework="pt") as f:
            keys = set(f.keys())
            mine = [k for k in keys if k.split("#")[0] in params]
            if mine and scalars is None:
                scalars = json.loads((f.metadata() or {}).get("optimizer", "null"))
            for key in mine:
                found[key] = f.get_tensor(key)
    for name, p in params.items():
        if name not in found:
            raise CapError(f"{folder}: holds no tensor for {name} (written for other trainable layers or modules?)")
        if found[name].shape != p.shape:
            raise CapError(f"{folder}: {name} has shape {list(found[name].shape)} there, {list(p.shape)} in this model")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(found[name])
    index = {id(p): i for i, p in enumerate(optimizer.param_groups[0]["params"])}
    saved = optimizer.state_dict()
    saved["state"] = {
        index[id(p)]: {key: found.get(f"{name}#{key}") for key in STATE_KEYS}
        for name, p in params.items()
        if f"{name}#exp_avg" in found
    }
    if scalars:
        group = saved["param_groups"][0]
        group.update({k: v for k, v in scalars.items() if k not in ("step", "foreach")})  # foreach: this run's
        group["step"] = torch.tensor(scalars["step"] or 0, dtype=torch.int32)
        group["triton"] = bool(scalars.get("triton")) and device.type == "cuda"  # a CPU-written one may go to CUDA
    optimizer.load_state_dict(saved)  # torch casts each state tensor to its parameter's dtype and device


# ---------------------------------------------------------------- RNG
def save_rng(folder: Path, rank: int) -> None:
    """This rank's torch, CUDA (when this process used CUDA), numpy and Python RNG states."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    tensors = {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(keys.astype(np.int64))}
    if torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = state
    metadata = {
        "numpy": json.dumps([name, int(pos), int(has_gauss), float(cached)]),
        "python": json.dumps([version, list(internal), gauss_next]),
    }
    _save(tensors, folder / f"rng-rank{rank}.safetensors", metadata)


def load_rng(folder: Path, rank: int) -> None:
    with safe_open(str(folder / f"rng-rank{rank}.safetensors"), framework="pt") as f:
        meta = f.metadata()
        torch.set_rng_state(f.get_tensor("torch"))
        name, pos, has_gauss, cached = json.loads(meta["numpy"])
        np.random.set_state((name, f.get_tensor("numpy_keys").numpy().astype(np.uint32), pos, has_gauss, cached))
        version, internal, gauss_next = json.loads(meta["python"])
        random.setstate((version, tuple(internal), gauss_next))
        cuda = sorted((k for k in f.keys() if k.startswith("cuda")), key=lambda k: int(k[4:]))
        if cuda and torch.cuda.is_initialized() and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([f.get_tensor(k) for k in cuda])
