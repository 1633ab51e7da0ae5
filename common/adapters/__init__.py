"""Adapter math shared by cap-train and cap-export (see docs/math.md).

- control.py:    ControlAdapter, y' = h + Δ + c·W'·dropout(Δ) on a decoder block's delta
- lora.py:       LoraLinear (PEFT-equal LoRA on a frozen, possibly 4-bit, linear) and inject_lora
- factors.py:    low-rank factor algebra (W' factors, Woodbury inverse, thin SVD) for export/metrics
- regularize.py: decoupled weight decay / max-norm on W = s·B·A after each optimizer step
- io.py:         adapter folders (adapter_model.safetensors + adapter_config.json), key layout
"""

from cap_common.adapters.control import ControlAdapter
from cap_common.adapters.io import (
    adapter_config_for,
    control_key,
    control_state_by_layer,
    control_tensors,
    load_adapter,
    lora_key,
    save_adapter,
)
from cap_common.adapters.lora import LoraLinear, inject_lora
from cap_common.adapters.regularize import regularize_model_, regularize_pair_, regularize_spectral_

__all__ = [
    "ControlAdapter",
    "LoraLinear",
    "inject_lora",
    "regularize_model_",
    "regularize_pair_",
    "regularize_spectral_",
    "save_adapter",
    "load_adapter",
    "adapter_config_for",
    "control_key",
    "lora_key",
    "control_tensors",
    "control_state_by_layer",
]
