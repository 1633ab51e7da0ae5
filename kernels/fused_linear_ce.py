"""LM head fused with the loss: L = CE(h·Wᵀ, y) without ever holding the [N, V] logits.

    h: [N, H] (or [..., H]), W: [V, H], y: [N] (already shifted; ignore_index rows count nothing)

For each chunk of C rows (C × V ≈ 256 MiB of fp32 unless chunk_size says otherwise):

    X_c   = h_c·Wᵀ                                  [C, V] in W's dtype (fp32 accumulation)
    ℓ_c, G_c = CE rows, ∂L/∂X_c                     G_c overwrites X_c (kernels.cross_entropy)
    ∂L/∂h_c = G_c·W                                 [C, H]
    ∂L/∂W  += G_cᵀ·h_c                              [V, H], only when W requires grad

all inside the forward, so the backward only scales the stored gradients by the incoming grad.
Peak extra memory: one [C, V] chunk (plus fp32 temporaries of that size on the torch path),
∂L/∂h and, for a trainable head, ∂L/∂W — accumulated in W's dtype (fp32 matmul accumulation within
a chunk, rounded to W's dtype between chunks) to avoid a second [V, H] buffer.
"""

from __future__ import annotations

import torch

from cap_common.dtypes import cpu_has_native_bf16
from cap_kernels.cross_entropy import ce_rows_backward, ce_rows_forward, default_chunk_rows, resolve_impl


def upcasts_head(device_type: str, dtype: torch.dtype) -> bool:
    """Whether the chunk matmuls use an fp32 copy of a `dtype` head weight on `device_type`: on the
    CPU for fp16, and for bf16 unless the CPU multiplies bf16 natively. Without native bf16 the
    [C,V]·[V,H] GEMM runs ~25× slower than in fp32 (measured: [256,49152]·[49152,576] 18.5 s in
    bf16, 0.7 s in fp32 on 2 cores); with AVX512-BF16, bf16 runs the head ~2× faster than the copy."""
    if device_type != "cpu" or dtype not in (torch.bfloat16, torch.float16):
        return False
    return dtype == torch.float16 or not cpu_has_native_bf16()


def _matmul_operand(weight: torch.Tensor) -> torch.Tensor:
    """The head weight as the chunk matmuls use it (see upcasts_head)."""
    return weight.float() if upcasts_head(weight.device.type, weight.dtype) else weight


def _chunks(h: torch.Tensor, w: torch.Tensor, rows: int):
    """(first row, h_c, X_c = h_c·Wᵀ) for each chunk of `rows` rows of h [N, H]; w: _matmul_operand."""
    for i in range(0, h.shape[0], rows):
        h_c = h[i : i + rows].to(w.dtype)
        yield i, h_c, h_c @ w.T


class _FusedLinearCE(torch.autograd.Function):
    """Forward computes the loss and both gradients chunk by chunk; backward scales them by g."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, scale, softcap, ignore_index, reduction, chunk_rows, impl, need_h, need_w):
        h = hidden.reshape(-1, hidden.shape[-1])
        y = labels.reshape(-1).contiguous()
        opts = dict(scale=scale, softcap=softcap, ignore_index=ignore_index, impl=impl)
        n_valid = (y != ignore_index).sum()
        denom = n_valid.clamp(min=1).float()
        gscale = (1.0 / denom if reduction == "mean" else torch.ones_like(denom)).reshape(1)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        w = _matmul_operand(weight)
        for i, h_c, logits in _chunks(h, w, chunk_rows):
            y_c = y[i : i + chunk_rows]
            loss, lse = ce_rows_forward(logits, y_c, chunk_rows=chunk_rows, **opts)
            total += loss.sum()
            if need_h or need_w:  # from here on `logits` holds ∂L/∂X_c
                ce_rows_backward(logits, y_c, lse, gscale, logits, chunk_rows=chunk_rows, **opts)
                if need_h and grad_h.dtype == w.dtype:
                    torch.mm(logits, w, out=grad_h[i : i + chunk_rows])
                elif need_h:
                    grad_h[i : i + chunk_rows] = logits @ w
                if need_w:
                    if w is weight:
                        grad_w.addmm_(logits.T, h_c)
                    else:
                        grad_w.add_((logits.T @ h_c).to(grad_w.dtype))
            del logits, loss, lse  # free this chunk before the next one is allocated
        ctx.grads = (grad_h, grad_w)
        ctx.hidden_shape = hidden.shape
        return total / denom if reduction == "mean" else total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.grads
        if grad_h is not None:
            grad_h = (grad_h * grad_out).view(ctx.hidden_shape)
        if grad_w is not None:
            grad_w = grad_w * grad_out
        return grad_h, grad_w, None, None, None, None, None, None, None, None, None


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_size: int | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """CE(softcap(s·h·Wᵀ), y) as a scalar; hidden [..., H], weight [V, H], labels [...].

    reduction "mean" (Σℓ/max(n_valid,1), 0 when all ignored) or "sum"; "none": ℓ per position
    (fp32, shaped like labels, 0 where ignored), without gradients (evals: every per-class sum from
    one pass over the head). chunk_size = rows per chunk (default: chunk × V fp32 ≈ 256 MiB).
    Gradients for hidden and, when it requires grad, weight are computed in this call; a frozen
    weight costs no [V, H] buffer.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"fused loss reduction must be mean, sum or none, not {reduction!r}")
    if softcap is not None and softcap <= 0:
        raise ValueError(f"softcap must be positive, not {softcap}")
    if hidden.shape[:-1] != labels.shape or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"shapes do not match: hidden {tuple(hidden.shape)}, weight "
            f"{tuple(weight.shape)}, labels {tuple(labels.shape)}"
        )
    impl = resolve_impl(impl, hidden.device)
    rows = chunk_size or default_chunk_rows(weight.shape[0])
    grad_on = torch.is_grad_enabled()
    if reduction == "none":
        if grad_on and (hidden.requires_grad or weight.requires_grad):
            raise ValueError("fused loss reduction 'none' computes no gradients; call it under torch.no_grad()")
        opts = dict(scale=float(logit_scale), softcap=softcap, ignore_index=ignore_index, impl=impl, chunk_rows=rows)
        h, y = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1).contiguous()
        out = torch.zeros(y.shape, dtype=torch.float32, device=hidden.device)
        for i, _, logits in _chunks(h, _matmul_operand(weight), rows):
            out[i : i + len(logits)] = ce_rows_forward(logits, y[i : i + len(logits)], **opts)[0]
        return out.view(labels.shape)
    return _FusedLinearCE.apply(
        hidden,
        weight,
        labels,
        float(logit_scale),
        softcap,
        ignore_index,
        reduction,
        rows,
        impl,
        grad_on and hidden.requires_grad,
        grad_on and weight.requires_grad,
    )
