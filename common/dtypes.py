"""The dtype names cap's configs and command lines use, and their torch dtypes (one table for all).

Which names a setting accepts is decided where it is parsed (the config's choices, a CLI's
click.Choice); this table only maps a name to its torch.dtype.
"""

from __future__ import annotations

import torch

from cap_common.errors import CapError

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def torch_dtype(name: str) -> torch.dtype:
    """The torch.dtype called `name` (e.g. "bfloat16"); an unknown name is a CapError."""
    try:
        return DTYPES[name]
    except KeyError:
        raise CapError(f"unknown dtype {name!r}; expected one of {', '.join(DTYPES)}") from None
