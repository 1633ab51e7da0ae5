"""The dtype names cap's configs and command lines use, and their torch dtypes (one table for all).

Which names a setting accepts is decided where it is parsed (the config's choices, a CLI's
click.Choice); this table only maps a name to its torch.dtype.
"""

from __future__ import annotations

import os

import torch

from cap_common.errors import CapError

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX). Without it a bf16 GEMM runs
    25-60× slower than fp32 (measured on AVX2-only Zen 3); with it about 2× faster than fp32.
    CAP_NATIVE_BF16=0 (or 1) overrides the detection: with oneDNN and ATen limited to AVX2
    (ONEDNN_MAX_CPU_ISA=AVX2, ATEN_CPU_CAPABILITY=avx2) it runs a CPU's non-native path on any CPU."""
    forced = os.environ.get("CAP_NATIVE_BF16", "")
    if forced in ("0", "1"):
        return forced == "1"
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def torch_dtype(name: str) -> torch.dtype:
    """The torch.dtype called `name` (e.g. "bfloat16"); an unknown name is a CapError."""
    try:
        return DTYPES[name]
    except KeyError:
        raise CapError(f"unknown dtype {name!r}; expected one of {', '.join(DTYPES)}") from None
