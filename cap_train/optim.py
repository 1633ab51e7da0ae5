"""The optimizer: torch-optimi Adam (Kahan summation automatically for bf16 parameters) with
gradient clipping on the global gradient norm over all pipeline stages:

    g ← g · min(1, c / ‖g‖),  ‖g‖² = Σ_stages Σ_params ‖g_p‖²   (accumulated in float64)

DeepSpeed's own clipping does not combine the stages' norms and does not report the norm, so
DeepSpeed gets gradient_clipping = 0 and this optimizer clips (and remembers ‖g‖) in step().

A step's bookkeeping is a fixed number of device ops whatever the number of parameters (foreach
ops: one launch per group of tensors on a GPU, not one per adapter matrix), and waits for the
device once, for ‖g‖. On a GPU the trainer asks torch-optimi for its foreach Adam (float32: bit for
bit its per-parameter loop; bf16 with Kahan summation: within one rounding of it); on a CPU, where
launches cost nothing, the per-parameter loop.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from optimi import Adam


class ClippedAdam(Adam):
    def __init__(self, params, *, max_grad_norm: float, **kwargs):
        super().__init__(params, **kwargs)
        self.max_grad_norm = max_grad_norm
        self.pipe_group = None  # set once DeepSpeed has built its process groups
        self.device = torch.device("cpu")  # the process group's device (NCCL: this rank's GPU), set by the trainer
        self.grad_norm: float | None = None

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        # a stage without trainable parameters still joins the all-reduce, on the group's device
        sq = torch.zeros((), dtype=torch.float64, device=self.device)
        if grads:
            sq += torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float64)).square().sum()
        if dist.is_initialized():
            dist.all_reduce(sq, group=self.pipe_group)
        norm = sq.sqrt()
        self.grad_norm = float(norm)
        if grads and self.max_grad_norm > 0 and self.grad_norm > self.max_grad_norm:
            torch._foreach_mul_(grads, self.max_grad_norm / (self.grad_norm + 1e-6))
        return super().step(closure)


@torch.no_grad()
def all_finite(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """0-dim bool on `device`, True iff every element of every tensor is finite, without waiting for
    the device: the float64 2-norms of float32/bf16 tensors cannot overflow, so their sum is finite
    exactly when every element is."""
    if not tensors:
        return torch.ones((), dtype=torch.bool, device=device)
    return torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float64)).sum().isfinite().to(device)
