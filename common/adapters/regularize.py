"""Decoupled regularization of adapters: one SGD step (no momentum, the optimizer's lr) after each
optimizer step, on the composite W = s·B·A of each (A [r,in], B [out,r]) pair, λ = lora_weight_decay:

    nuclear: A ← A − lr·2λs·A,            B ← B − lr·2λs·B
    l2:      A ← A − lr·λs·Bᵀ·W,          B ← B − lr·λs·W·Aᵀ          (½λ‖W‖_F²)
    l1:      as l2 with W/‖W‖_F and lr·λ → min(lr·λ, ‖W‖_F)            (λ‖W‖_F, soft threshold)
    max-norm (lora_max_norm > 0): then if ‖W‖_F > max, A and B *= √(max/‖W‖_F)

Both updates of a step use the pre-step A and B. No H×H matrix is formed: Bᵀ·W = s·(BᵀB)·A and
W·Aᵀ = s·B·(AAᵀ), ‖W‖_F² = s²·trace((BᵀB)(AAᵀ)); the step is computed in float64 and rounded once.

Spectral control adapters have no (A, B) pair; the natural analogue acts on the generator
L = log(I + W'₊) = Q·diag(S)·Qᵀ, whose norms are ‖L‖_F = ‖S‖₂ and ‖L‖_* = ‖S‖₁, and which treats
the +1 and −1 branches alike (log(I + W'₋) = −L):
    nuclear: S ← sign(S)·max(|S| − lr·λ, 0)     (prox of λ‖L‖_*)
    l2:      S ← S − lr·λ·S                      (½λ‖L‖_F²)
    l1:      S ← S·max(0, 1 − lr·λ/‖S‖₂)         (prox of λ‖L‖_F; nothing when S ≈ 0)
    max-norm: if ‖S‖₂ > max, S ← S·max/‖S‖₂       (so ‖W'₊‖₂, ‖W'₋‖₂ ≤ e^max − 1)
Q is left alone (W' depends on it only through orth(Q)).

Every function returns {"norm": ‖W‖_F after, "removed": ‖W_before − W_after‖_F} (for spectral W'₊)
as 0-dim float64 tensors on the parameters' device: nothing syncs with the device until logged.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from cap_common.adapters import factors
from cap_common.adapters.control import ControlAdapter
from cap_common.adapters.lora import LoraLinear

KINDS = ("nuclear", "l2", "l1")
_ZERO_NORM = 1e-12  # ‖W‖_F below this counts as zero for l1 (no direction to shrink along)


def _norm(A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """‖s·B·A‖_F from r×r Gram matrices (A, B float64)."""
    return scale * factors.frobenius_norm(B, A)


@torch.no_grad()
def regularize_pair_(
    A: torch.Tensor,
    B: torch.Tensor,
    scale: float,
    lr: float,
    weight_decay: float,
    kind: str = "nuclear",
    max_norm: float = 0.0,
) -> dict[str, torch.Tensor]:
    """Decay then max-norm W = s·B·A in place; A [r,in], B [out,r]. See the module docstring."""
    if kind not in KINDS:
        raise ValueError(f"unknown weight decay type {kind!r}; expected one of {KINDS}")
    A0, B0 = A.double(), B.double()
    if weight_decay == 0 and max_norm == 0:
        return {"norm": _norm(A0, B0, scale), "removed": A0.new_zeros(())}
    A1, B1 = A0, B0
    step = lr * weight_decay
    if step > 0 and kind == "nuclear":
        A1, B1 = A0 * (1 - 2 * step * scale), B0 * (1 - 2 * step * scale)
    elif step > 0:
        gram_B, gram_A = B0.T @ B0, A0 @ A0.T  # BᵀB, AAᵀ: [r,r]
        coef = step * scale**2  # lr·λ·s · s (W = s·B·A)
        if kind == "l1":
            norm = _norm(A0, B0, scale)
            shrink = torch.minimum(norm.new_tensor(step), norm)
            coef = torch.where(norm > _ZERO_NORM, shrink * scale**2 / norm.clamp_min(_ZERO_NORM), 0.0)
        A1, B1 = A0 - coef * (gram_B @ A0), B0 - coef * (B0 @ gram_A)
    if max_norm > 0:
        norm = _norm(A1, B1, scale)
        factor = (max_norm / norm.clamp_min(max_norm)).sqrt()  # 1 when ‖W‖_F ≤ max
        A1, B1 = A1 * factor, B1 * factor
    A.copy_(A1)
    B.copy_(B1)
    # W0 − W1 = s·(B0·dA + dB·A1): small factors, so no cancellation between two large norms.
    A1, B1 = A.double(), B.double()
    dA, dB = A0 - A1, B0 - B1
    removed = scale * factors.frobenius_norm(torch.cat([B0, dB], 1), torch.cat([dA, A1], 0))
    return {"norm": _norm(A1, B1, scale), "removed": removed}


@torch.no_grad()
def regularize_spectral_(
    S: torch.Tensor, lr: float, weight_decay: float, kind: str = "nuclear", max_norm: float = 0.0
) -> dict[str, torch.Tensor]:
    """Decay then max-norm the log-spectrum S [r] of a spectral control adapter in place."""
    if kind not in KINDS:
        raise ValueError(f"unknown weight decay type {kind!r}; expected one of {KINDS}")
    S0 = S.double()
    S1 = S0
    step = lr * weight_decay
    if step > 0 and kind == "nuclear":
        S1 = S0.sign() * (S0.abs() - step).clamp_min(0)
    elif step > 0 and kind == "l2":
        S1 = S0 * (1 - step)
    elif step > 0:
        norm = S0.norm()
        S1 = S0 * torch.where(norm > _ZERO_NORM, (1 - step / norm.clamp_min(_ZERO_NORM)).clamp_min(0), 1.0)
    if max_norm > 0:
        S1 = S1 * (max_norm / S1.norm().clamp_min(max_norm))
    if weight_decay or max_norm:
        S.copy_(S1)
    S1 = S.double()
    # Q is shared and orthonormal: ‖W'₊(S0) − W'₊(S1)‖_F = ‖expm1(S0) − expm1(S1)‖₂.
    return {"norm": torch.expm1(S1).norm(), "removed": (torch.expm1(S0) - torch.expm1(S1)).norm()}


def _named_adapters(modules) -> Iterable[tuple[str, nn.Module]]:
    roots = [("", modules)] if isinstance(modules, nn.Module) else [(f"{i}.", m) for i, m in enumerate(modules)]
    for prefix, root in roots:
        for name, module in root.named_modules():
            if isinstance(module, (ControlAdapter, LoraLinear)):
                yield (prefix + name).rstrip("."), module


def regularize_model_(modules, lr: float, cfg) -> dict[str, dict[str, torch.Tensor]]:
    """Regularize every ControlAdapter and LoraLinear under `modules` (a module or a list of them).

    Uses cfg.lora_weight_decay, cfg.lora_weight_decay_type and cfg.lora_max_norm; returns
    {module name: {"norm", "removed"}} (names prefixed "i." for the i-th module of a list).
    """
    decay, kind, max_norm = cfg.lora_weight_decay, cfg.lora_weight_decay_type, cfg.lora_max_norm
    stats = {}
    for name, module in _named_adapters(modules):
        if isinstance(module, LoraLinear):
            stats[name] = regularize_pair_(
                module.lora_A.weight, module.lora_B.weight, module.scale, lr, decay, kind, max_norm
            )
        elif module.adapter_type == "spectral":
            stats[name] = regularize_spectral_(module.S, lr, decay, kind, max_norm)
        else:
            stats[name] = regularize_pair_(module.A, module.B, module.scale, lr, decay, kind, max_norm)
    return stats
