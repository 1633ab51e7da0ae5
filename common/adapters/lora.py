"""LoRA: y = base(x) + s·B·A·dropout(x), s = alpha / r, wrapping a frozen base linear.

Same parameters, names and numerics as PEFT's `lora.Linear` (so saved keys are PEFT's:
`<module>.lora_A.weight` [r,in], `<module>.lora_B.weight` [out,r]). The base may be an nn.Linear
or a bitsandbytes Linear4bit (QLoRA); the adapter keeps its own dtype (lora_weight_dtype).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from cap_common.adapters import factors


class LoraLinear(nn.Module):
    """base_layer (frozen) + s·lora_B(lora_A(dropout(x))); lora_A kaiming-uniform, lora_B zeros."""

    def __init__(
        self, base_layer: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, dtype: torch.dtype = torch.float32
    ):
        super().__init__()
        self.base_layer = base_layer
        base_layer.requires_grad_(False)
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        device = base_layer.weight.device
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, dtype=dtype, device=device)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, dtype=dtype, device=device)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., in] → [..., out], in the base output's dtype (sum formed in the wider dtype, as PEFT)."""
        result = self.base_layer(x)
        x = self.lora_dropout(x.to(self.lora_A.weight.dtype))
        return (result + self.lora_B(self.lora_A(x)) * self.scale).to(result.dtype)

    def factors(self, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
        """(U, V) with s·B·A = U·V: √s on each side."""
        root = math.sqrt(self.scale)
        return root * self.lora_B.weight.detach().to(dtype), root * self.lora_A.weight.detach().to(dtype)

    def norm_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(B, A, s): s·B·A is the update; no copies (for factors.norms)."""
        return self.lora_B.weight, self.lora_A.weight, self.scale

    def norms(self) -> dict[str, float]:
        """‖s·B·A‖_F and its spectral norm, from the factors (for metrics)."""
        frobenius, spectral = factors.norms([self.norm_factors()])[0]
        return {"frobenius": frobenius, "spectral": spectral}


def inject_lora(
    model_or_layer: nn.Module,
    target_modules,
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    dtype: torch.dtype = torch.float32,
) -> list[str]:
    """Replace matching nn.Linear children by LoraLinear; returns the replaced modules' names.

    A module matches when the last component of its name is in `target_modules`; None means every
    nn.Linear (bitsandbytes Linear4bit included) except `lm_head`. Linears already wrapped are skipped.
    """
    targets = None if target_modules is None else set(target_modules)
    found = []
    for name, module in model_or_layer.named_modules():
        if isinstance(module, LoraLinear):
            continue
        for child_name, child in module.named_children():
            if not isinstance(child, nn.Linear):
                continue
            if targets is None and child_name == "lm_head" or targets is not None and child_name not in targets:
                continue
            found.append((module, child_name, child, f"{name}.{child_name}" if name else child_name))
    for parent, child_name, child, _ in found:
        setattr(parent, child_name, LoraLinear(child, rank, alpha, dropout, dtype))
    return [full_name for *_, full_name in found]
