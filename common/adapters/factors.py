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


@torch.no_grad()
def norms(pairs: list[tuple[torch.Tensor, torch.Tensor, float]]) -> list[tuple[float, float]]:
    """(‖s·U·V‖_F, ‖s·U·V‖₂) of each (U [m,k], V [k,n], s), with one copy from the device in all.

    On the device, per group of pairs of one shape: the k×k Gram matrices Gu = UᵀU and Gv = V·Vᵀ
    in float64 (a batched matmul each; nothing waits for the device). On the CPU, from
    Gu = P·diag(d)·Pᵀ and Ru = diag(√d)·Pᵀ (U = X·Ru with X orthonormal on U's range):

        σ(U·V)² = eig(Ru·Gv·Ruᵀ),        ‖U·V‖_F² = Σᵢⱼ (Gu ⊙ Gv)ᵢⱼ = trace(Gu·Gv)

    (A QR and an SVD per adapter on a GPU wait for the device several times each, and training
    logs these norms every step for every adapter: hundreds with LoRA on every linear.)
    """
    groups: dict[tuple, list[int]] = {}
    for i, (U, V, _) in enumerate(pairs):
        groups.setdefault((tuple(U.shape), tuple(V.shape), U.device), []).append(i)
    if not groups:
        return []
    grams = []
    for members in groups.values():
        Us = torch.stack([pairs[i][0] for i in members]).double()
        Vs = torch.stack([pairs[i][1] for i in members]).double()
        grams += [(Us.mT @ Us).flatten(), (Vs @ Vs.mT).flatten()]
    flat = torch.cat([g.to(grams[0].device) for g in grams]).cpu()
    out: list[tuple[float, float]] = [(0.0, 0.0)] * len(pairs)
    at = 0
    for members in groups.values():
        k = pairs[members[0]][0].shape[-1]
        n = len(members) * k * k
        Gu, Gv = flat[at : at + n].view(-1, k, k), flat[at + n : at + 2 * n].view(-1, k, k)
        at += 2 * n
        d, P = torch.linalg.eigh(Gu)
        Ru = d.clamp_min(0).sqrt()[:, :, None] * P.mT
        M = Ru @ Gv @ Ru.mT
        spectral = torch.linalg.eigvalsh((M + M.mT) / 2)[:, -1].clamp_min(0).sqrt().tolist()
        frobenius = (Gu * Gv).sum((1, 2)).clamp_min(0).sqrt().tolist()
        for i, f, sp in zip(members, frobenius, spectral):
            s = abs(pairs[i][2])
            out[i] = (s * f, s * sp)
    return out


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
