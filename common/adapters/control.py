"""Control Adapter: a class-signed multiplicative transform of a decoder block's residual delta.

    y' = h + Δ + c·W'·dropout(Δ)          Δ = layer(h) − h: [B,T,H],  c ∈ {+1, −1, 0}: [B,T]

Types (s = alpha / r):
- full:           W' = W = s·B·A                  A [r,H] (PEFT lora_A init), B [H,r] zeros
- symmetrise:     W' = (W + Wᵀ)/2
- antisymmetrise: W' = (W − Wᵀ)/2
- spectral:       W'₊ = Q·diag(eˢ − 1)·Qᵀ for c = +1, W'₋ = Q·diag(e⁻ˢ − 1)·Qᵀ for c = −1,
                  so that (I + W'₋) = (I + W'₊)⁻¹ exactly. Q [H,r] orthonormal, S [r] zeros.

Spectral Q is trainable. The parameter `Q` is free; the forward uses its orthonormal basis
orth(Q) (reduced QR; W' does not depend on the column signs QR picks), so (I+W'₋)(I+W'₊) = I holds
exactly whatever the optimizer does to `Q`, and the gradient moves the subspace as well as the
spectrum. `state()` (what gets saved as control_Q / control_S) holds orth(Q), so a saved file is
exactly orthonormal and loading it changes nothing.

The H×H matrix is never built in the forward: x·W'ᵀ is applied through the rank-r factors.
Class 0 positions get exactly Δ back (bitwise).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from cap_common.adapters import factors

TYPES = factors.CONTROL_TYPES


def orthonormal(Q: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of Q's columns (reduced QR, differentiable), in Q's dtype.

    QR runs in at least float32 (there is no bf16 QR).
    """
    work = torch.promote_types(Q.dtype, torch.float32)
    return torch.linalg.qr(Q.to(work)).Q.to(Q.dtype)


class ControlAdapter(nn.Module):
    """The adapter of one decoder layer; `forward(delta, classes)` returns the adapted delta."""

    def __init__(
        self,
        hidden_size: int,
        rank: int,
        alpha: float,
        adapter_type: str = "full",
        dropout: float = 0.0,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        if adapter_type not in TYPES:
            raise ValueError(f"unknown control adapter type {adapter_type!r}; expected one of {TYPES}")
        self.hidden_size, self.rank, self.alpha = hidden_size, rank, alpha
        self.adapter_type = adapter_type
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if adapter_type == "spectral":
            gaussian = torch.randn(hidden_size, rank, dtype=torch.float64)
            # contiguous: QR returns a column-major Q, and DeepSpeed views parameters as bytes to broadcast them
            self.Q = nn.Parameter(torch.linalg.qr(gaussian).Q.to(dtype).contiguous())
            self.S = nn.Parameter(torch.zeros(rank, dtype=dtype))
        else:
            self.A = nn.Parameter(torch.empty(rank, hidden_size, dtype=dtype))
            self.B = nn.Parameter(torch.zeros(hidden_size, rank, dtype=dtype))
            nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))

    @property
    def dtype(self) -> torch.dtype:
        return self.S.dtype if self.adapter_type == "spectral" else self.A.dtype

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, rank={self.rank}, alpha={self.alpha}, type={self.adapter_type}"

    # ------------------------------------------------------------ forward
    def forward(self, delta: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """Δ + c·W'·dropout(Δ) (spectral: W'₊ / W'₋ by class); Δ: [..., H], classes: [...] in {+1,−1,0}."""
        c = classes.unsqueeze(-1)
        x = self.dropout(delta.to(self.dtype))
        if self.adapter_type == "spectral":
            Q = orthonormal(self.Q)
            # Q·diag(exp(c·S) − 1)·Qᵀ·x for each token's own class c.
            update = ((x @ Q) * torch.expm1(c.to(self.dtype) * self.S)) @ Q.T
        else:
            update = c.to(self.dtype) * self._apply_w(x)
        return torch.where(c != 0, delta + update.to(delta.dtype), delta)

    def _apply_w(self, x: torch.Tensor) -> torch.Tensor:
        """x·W'ᵀ for rows x [..., H]: s·(x·Aᵀ)·Bᵀ, plus or minus its transpose s·(x·B)·A, halved."""
        w_x = (x @ self.A.T) @ self.B.T
        if self.adapter_type == "full":
            return self.scale * w_x
        wt_x = (x @ self.B) @ self.A
        if self.adapter_type == "symmetrise":
            return (0.5 * self.scale) * (w_x + wt_x)
        return (0.5 * self.scale) * (w_x - wt_x)

    # ------------------------------------------------------------ views of the weights
    @torch.no_grad()
    def state(self) -> dict[str, torch.Tensor]:
        """What is saved: {"A", "B"} or, for spectral, {"Q": orth(Q), "S"} (detached copies)."""
        if self.adapter_type == "spectral":
            return {"Q": orthonormal(self.Q).detach().clone(), "S": self.S.detach().clone()}
        return {"A": self.A.detach().clone(), "B": self.B.detach().clone()}

    @torch.no_grad()
    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of `state()`; shapes must match (io.load_adapter has checked files already)."""
        for name, value in state.items():
            getattr(self, name).copy_(value)

    def factors(self, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
        """(U, V) with W'₊ = U·V exactly, rank r or 2r (see factors.control_weight_factors)."""
        state = {k: v.to(dtype) for k, v in self.state().items()}
        return factors.control_weight_factors(state, self.adapter_type, self.scale)

    def weight(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The dense W'₊ [H,H]; for tests and small models only."""
        U, V = self.factors(dtype)
        return U @ V

    @torch.no_grad()
    def norm_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(U, V, s) with the singular values of W'₊ those of s·U·V, built on the device without
        waiting for it (for factors.norms). Spectral: W'₊ = orth(Q)·diag(eˢ − 1)·orth(Q)ᵀ has the
        singular values of diag(eˢ − 1), so no QR is needed."""
        if self.adapter_type == "spectral":
            return torch.diag(torch.expm1(self.S)), torch.eye(self.rank, dtype=self.S.dtype, device=self.S.device), 1.0
        if self.adapter_type == "full":
            return self.B, self.A, self.scale
        sign = 1.0 if self.adapter_type == "symmetrise" else -1.0
        return torch.cat([self.B, sign * self.A.T], 1), torch.cat([self.A, self.B.T], 0), 0.5 * self.scale

    def norms(self) -> dict[str, float]:
        """‖W'₊‖_F and its spectral norm, from the factors (for metrics)."""
        frobenius, spectral = factors.norms([self.norm_factors()])[0]
        return {"frobenius": frobenius, "spectral": spectral}
