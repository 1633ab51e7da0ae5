"""Low-rank factor algebra shared by cap-train (metrics) and cap-export.

Every function takes and returns factors U [m,k], V [k,n] of a matrix M = U·V and never builds an
m×n matrix; the work is QR/SVD/solves of k×k cores. They compute in the dtype they are given, so
pass float64 for exports. Control adapter states are dicts as `ControlAdapter.state()` and
`io.control_state_by_layer` give them: {"A": [r,H], "B": [H,r]} or {"Q": [H,r], "S": [r]}.
"""

from __future__ import annotations

import math

import torch

from cap_common.errors import CapError

CONTROL_TYPES = ("full", "symmetrise", "antisymmetrise", "spectral")


def control_weight_factors(state: dict, adapter_type: str, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """W'₊ = U·V exactly, with k = r (full, spectral) or 2r (symmetrise, antisymmetrise).

    full:            W' = s·B·A                 → U = √s·B,             V = √s·A
    (anti)symmetrise: W' = ½s(B·A ± Aᵀ·Bᵀ)      → U = √(s/2)·[B, ±Aᵀ],  V = √(s/2)·[A; Bᵀ]
    spectral:        W' = Q·diag(eˢ−1)·Qᵀ        → see `spectral_factors` (`scale` is unused)
    """
    if adapter_type == "spectral":
        return spectral_factors(state["Q"], state["S"], +1)
    A, B = state["A"], state["B"]
    if adapter_type == "full":
        root = math.sqrt(scale)
        return root * B, root * A
    if adapter_type in ("symmetrise", "antisymmetrise"):
        sign = 1.0 if adapter_type == "symmetrise" else -1.0
        root = math.sqrt(scale / 2)
        return root * torch.cat([B, sign * A.T], dim=1), root * torch.cat([A, B.T], dim=0)
    raise ValueError(f"unknown control adapter type {adapter_type!r}; expected one of {CONTROL_TYPES}")


def spectral_factors(Q: torch.Tensor, S: torch.Tensor, sign: int = +1) -> tuple[torch.Tensor, torch.Tensor]:
    """Q·diag(exp(sign·S) − 1)·Qᵀ = U·V with U = Q·diag(expm1(sign·S)) [H,r], V = Qᵀ [r,H].

    With Q orthonormal, sign −1 gives the exact inverse: (I + W'₋)(I + W'₊) = I.
    """
    return Q * torch.expm1(sign * S), Q.T


def inverse_factors(U: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(I + U·V)⁻¹ − I = U2·V2 by Woodbury: −U·(I_k + V·U)⁻¹·V, still rank k.

    Raises CapError when I + U·V is numerically singular (cond(I_k + V·U)·eps(dtype) > 1e-3), i.e.
    has no usable inverse; pass float64 factors.
    """
    k = U.shape[1]
    core = torch.eye(k, dtype=U.dtype, device=U.device) + V @ U
    cond = torch.linalg.cond(core).item() if k else 1.0
    if not math.isfinite(cond) or cond * torch.finfo(U.dtype).eps > 1e-3:
        raise CapError(f"I + W' is singular (condition number {cond:.3g} of its k×k core); it has no inverse")
    return -U, torch.linalg.solve(core, V)


def thin_svd(U: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of U·V from the factors: U·V = X·diag(σ)·Yᵀ with X [m,k], σ [k] descending, Y [n,k].

    QR of U and of Vᵀ, then an SVD of the k×k core R_U·R_Vᵀ.
    """
    Qu, Ru = torch.linalg.qr(U)
    Qv, Rv = torch.linalg.qr(V.T)
    x, sigma, yt = torch.linalg.svd(Ru @ Rv.T)
    return Qu @ x, sigma, Qv @ yt.T


def singular_values(U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """The k largest singular values of U·V, descending (the rest are zero). R factors only
    (mode "r": no Q is formed)."""
    Ru = torch.linalg.qr(U, mode="r").R
    Rv = torch.linalg.qr(V.T, mode="r").R
    return torch.linalg.svdvals(Ru @ Rv.T)


def thin_svd_truncate(U: torch.Tensor, V: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-`rank` approximation of U·V (Eckart–Young) as factors U_r [m,R], V_r [R,n].

    The singular values are split as √σ on each side. R = min(rank, k): asking for more than the
    factors hold returns them exactly (re-balanced).
    """
    X, sigma, Y = thin_svd(U, V)
    R = min(rank, sigma.shape[0])
    root = sigma[:R].sqrt()
    return X[:, :R] * root, root[:, None] * Y[:, :R].T


def frobenius_norm(U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """‖U·V‖_F = √trace((UᵀU)(VVᵀ)), computed in float64 from k×k Gram matrices."""
    U, V = U.double(), V.double()
    return ((U.T @ U) * (V @ V.T)).sum().clamp_min(0).sqrt()
