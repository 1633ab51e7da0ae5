"""Token cross entropy over logits without an fp32 copy of the whole [N, V] matrix.

For a row x ∈ R^V (raw logits, bf16 or fp32) with label y, in fp32:

    u = s·x                         logit scale s (Cohere); s = 1 otherwise
    z = c·tanh(u/c)                 final-logit softcap c (Gemma 2); z = u when c is None
    lse = log Σ_v exp(z_v)          online over vocab tiles: m ← max(m, max z_tile),
                                    S ← S·exp(m_old − m) + Σ exp(z_tile − m)
    ℓ = lse − z_y                   ℓ = 0 when y == ignore_index
    ∂ℓ/∂x = (softmax(z) − onehot(y)) · s·(1 − tanh²(u/c))      (· s without softcap)

Reductions: "mean" = Σℓ / max(n_valid, 1) (0 when every label is ignored), "sum" = Σℓ, "none" =
ℓ per row. The backward scales ∂ℓ/∂x by g/max(n_valid, 1) (mean), g (sum) or g_i (none).

Two implementations with the same numerics: a Triton kernel (one program per row, looping over
vocab tiles of BLOCK) and a torch path chunked over rows, so at most chunk × V is ever in fp32.
`impl="auto"` takes Triton for CUDA tensors when triton imports, torch otherwise; the env var
CAP_LOSS_IMPL=triton|torch overrides "auto". When triton is imported with TRITON_INTERPRET=1 (set
it before the first import of triton), impl="triton" runs the kernel on CPU tensors (the tests).
Over 300 lines: the two implementations and their autograd function are kept side by side so
their numerics can be read against each other.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch path still works
    triton = tl = None

CHUNK_BYTES = 256 * 2**20  # fp32 working set per chunk of rows: chunk × V × 4 ≈ 256 MiB
MAX_BLOCK = 4096


if tl is not None:

    @triton.jit
    def _ce_forward_kernel(
        x_ptr,
        x_stride,
        labels_ptr,
        loss_ptr,
        lse_ptr,
        n_cols,
        ignore_index,
        scale,
        softcap,
        HAS_SOFTCAP: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """One row: lse and ℓ = lse − z_y (0 for ignored rows), online over vocab tiles."""
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * x_stride
        label = tl.load(labels_ptr + row).to(tl.int64)
        valid = label != ignore_index
        m = float("-inf")
        s = 0.0
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < n_cols
            z = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32) * scale
            if HAS_SOFTCAP:
                e = tl.exp(-2.0 * tl.abs(z / softcap))  # tanh(a) = sign(a)(1 − e)/(1 + e)
                t = (1.0 - e) / (1.0 + e)
                z = softcap * tl.where(z < 0, -t, t)
            z = tl.where(mask, z, float("-inf"))
            m_new = tl.maximum(m, tl.max(z, axis=0))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # an all −inf tile
            s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(z - m_safe), axis=0)
            m = m_new
        lse = m + tl.log(s)
        z_y = tl.load(x_row + tl.where(valid, label, 0)).to(tl.float32) * scale
        if HAS_SOFTCAP:
            e = tl.exp(-2.0 * tl.abs(z_y / softcap))
            t = (1.0 - e) / (1.0 + e)
            z_y = softcap * tl.where(z_y < 0, -t, t)
        tl.store(loss_ptr + row, tl.where(valid, lse - z_y, 0.0))
        tl.store(lse_ptr + row, lse)

    @triton.jit
    def _ce_grad_kernel(
        x_ptr,
        x_stride,
        g_ptr,
        g_stride,
        labels_ptr,
        lse_ptr,
        gscale_ptr,
        gscale_stride,
        n_cols,
        ignore_index,
        scale,
        softcap,
        HAS_SOFTCAP: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """One row: dx = (softmax(z) − onehot(y))·dz/dx·gscale; g_ptr may alias x_ptr."""
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * x_stride
        g_row = g_ptr + row * g_stride
        label = tl.load(labels_ptr + row).to(tl.int64)
        valid = label != ignore_index
        lse = tl.load(lse_ptr + row)
        gs = tl.load(gscale_ptr + row * gscale_stride).to(tl.float32)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < n_cols
            z = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32) * scale
            if HAS_SOFTCAP:
                e = tl.exp(-2.0 * tl.abs(z / softcap))
                t = (1.0 - e) / (1.0 + e)
                t = tl.where(z < 0, -t, t)
                z = softcap * t
                dz = scale * (1.0 - t * t)
            else:
                dz = scale
            p = tl.exp(z - lse)
            d = tl.where(cols == label, p - 1.0, p) * (dz * gs)
            d = tl.where(valid, d, 0.0)
            tl.store(g_row + cols, d.to(g_ptr.dtype.element_ty), mask=mask)


def _interpreting() -> bool:
    """True when triton was imported with TRITON_INTERPRET=1 (its jit decorators ran then)."""
    return not isinstance(_ce_forward_kernel, triton.runtime.jit.JITFunction)


def resolve_impl(impl: str, device: torch.device) -> str:
    """ "auto" | "triton" | "torch" → "triton" | "torch" for tensors on `device`."""
    if impl == "auto":
        impl = os.environ.get("CAP_LOSS_IMPL", "auto") or "auto"
        if impl == "auto":
            return "triton" if device.type == "cuda" and triton is not None else "torch"
    if impl not in ("triton", "torch"):
        raise ValueError(f"loss impl must be auto, triton or torch, not {impl!r}")
    if impl == "triton":
        if triton is None:
            raise RuntimeError("loss impl 'triton' requested but triton is not installed")
        if device.type != "cuda" and not _interpreting():
            raise RuntimeError("loss impl 'triton' needs CUDA tensors (or TRITON_INTERPRET=1)")
    return impl


def default_chunk_rows(n_cols: int, budget_bytes: int = CHUNK_BYTES) -> int:
    """Rows per chunk so that rows × n_cols fp32 ≈ budget_bytes (at least 1)."""
    return max(1, budget_bytes // (4 * max(n_cols, 1)))


def _meta(n_cols: int, block_size: int | None, softcap: float | None) -> dict:
    """Compile-time kernel arguments: vocab tile BLOCK (power of two), HAS_SOFTCAP, num_warps."""
    block = block_size or min(MAX_BLOCK, triton.next_power_of_2(n_cols))
    if block & (block - 1):
        raise ValueError(f"block_size must be a power of two, not {block}")
    warps = min(8, max(1, block // 512))
    return dict(HAS_SOFTCAP=softcap is not None, BLOCK=block, num_warps=warps)


def _torch_transform(x: torch.Tensor, scale: float, softcap: float | None, need_dz: bool = True):
    """x [c,V] → (z, dz/dx): z fp32 [c,V]; dz/dx fp32 [c,V] with softcap, else the float s.

    With softcap and need_dz=False, dz/dx is None. x itself is never written."""
    z = x.float() * scale if scale != 1.0 else x.float()
    if softcap is None:
        return z, scale
    if not need_dz:
        return (z / softcap).tanh_().mul_(softcap), None
    t = (z / softcap).tanh_()
    z = t * softcap
    dz = t.mul_(t).neg_().add_(1.0)  # 1 − tanh², in place over t
    return z, dz.mul_(scale) if scale != 1.0 else dz


def ce_rows_forward(
    x, labels, *, scale=1.0, softcap=None, ignore_index=-100, impl="torch", block_size=None, chunk_rows=None
):
    """x [N,V] (row stride arbitrary, unit column stride), labels [N] → (ℓ [N], lse [N]) in fp32."""
    n, v = x.shape
    loss = torch.empty(n, dtype=torch.float32, device=x.device)
    lse = torch.empty(n, dtype=torch.float32, device=x.device)
    if n == 0:
        return loss, lse
    if impl == "triton":
        _ce_forward_kernel[(n,)](
            x,
            x.stride(0),
            labels,
            loss,
            lse,
            v,
            ignore_index,
            float(scale),
            float(softcap or 1.0),
            **_meta(v, block_size, softcap),
        )
        return loss, lse
    rows = chunk_rows or default_chunk_rows(v)
    for i in range(0, n, rows):
        y = labels[i : i + rows]
        z, _ = _torch_transform(x[i : i + rows], scale, softcap, need_dz=False)
        valid = y != ignore_index
        lse_c = torch.logsumexp(z, dim=-1)
        z_y = z.gather(1, torch.where(valid, y, 0).long()[:, None])[:, 0]
        loss[i : i + rows] = torch.where(valid, lse_c - z_y, 0.0)
        lse[i : i + rows] = lse_c
    return loss, lse


def ce_rows_backward(
    x,
    labels,
    lse,
    gscale,
    out,
    *,
    scale=1.0,
    softcap=None,
    ignore_index=-100,
    impl="torch",
    block_size=None,
    chunk_rows=None,
):
    """out [N,V] ← (softmax(z) − onehot(y))·dz/dx·gscale; gscale fp32 [1] or [N]; out may be x."""
    n, v = x.shape
    if n == 0:
        return out
    gscale = gscale.float().contiguous()
    if impl == "triton":
        _ce_grad_kernel[(n,)](
            x,
            x.stride(0),
            out,
            out.stride(0),
            labels,
            lse,
            gscale,
            0 if gscale.numel() == 1 else 1,
            v,
            ignore_index,
            float(scale),
            float(softcap or 1.0),
            **_meta(v, block_size, softcap),
        )
        return out
    rows = chunk_rows or default_chunk_rows(v)
    for i in range(0, n, rows):
        y = labels[i : i + rows]
        z, dz = _torch_transform(x[i : i + rows], scale, softcap)
        valid = y != ignore_index
        p = torch.sub(z, lse[i : i + rows, None]).exp_()
        p.scatter_add_(1, torch.where(valid, y, 0).long()[:, None], -valid[:, None].float())
        gs = (gscale if gscale.numel() == 1 else gscale[i : i + rows])[:, None]
        if isinstance(dz, torch.Tensor):
            p.mul_(dz)
        else:
            gs = gs * dz
        p.mul_(gs).masked_fill_(~valid[:, None], 0.0)
        out[i : i + rows].copy_(p)
    return out


class _CrossEntropy(torch.autograd.Function):
    """logits [N,V], labels [N] → reduced loss; backward recomputes softmax from saved lse [N]."""

    @staticmethod
    def forward(
        ctx, logits, labels, scale, softcap, ignore_index, reduction, impl, inplace_backward, block_size, chunk_rows
    ):
        opts = dict(
            scale=scale,
            softcap=softcap,
            ignore_index=ignore_index,
            impl=impl,
            block_size=block_size,
            chunk_rows=chunk_rows,
        )
        loss, lse = ce_rows_forward(logits, labels, **opts)
        n_valid = (labels != ignore_index).sum()
        ctx.save_for_backward(logits, labels, lse, n_valid)
        ctx.opts, ctx.reduction, ctx.inplace = opts, reduction, inplace_backward
        if reduction == "none":
            return loss
        total = loss.sum()
        return total / n_valid.clamp(min=1) if reduction == "mean" else total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        logits, labels, lse, n_valid = ctx.saved_tensors
        gscale = grad_out.float().reshape(-1)
        if ctx.reduction == "mean":
            gscale = gscale / n_valid.clamp(min=1)
        out = logits if ctx.inplace else torch.empty_like(logits)
        ce_rows_backward(logits, labels, lse, gscale, out, **ctx.opts)
        return out, None, None, None, None, None, None, None, None, None


def cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    impl: str = "auto",
    inplace_backward: bool = False,
    block_size: int | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Cross entropy of logits [..., V] against labels [...] (already shifted), computed in fp32.

    reduction "mean" → scalar Σℓ/max(n_valid,1); "sum" → scalar Σℓ; "none" → ℓ shaped like labels.
    inplace_backward writes dlogits into the logits buffer (only when nothing else needs it).
    block_size: Triton vocab tile (power of two, default min(4096, next_pow2(V)));
    chunk_size: rows per chunk of the torch path (default so chunk × V fp32 ≈ 256 MiB).
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be mean, sum or none, not {reduction!r}")
    if softcap is not None and softcap <= 0:
        raise ValueError(f"softcap must be positive, not {softcap}")
    impl = resolve_impl(impl, logits.device)
    x = logits.reshape(-1, logits.shape[-1])
    if x.stride(-1) != 1:
        x = x.contiguous()
    y = labels.reshape(-1)
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"labels {tuple(labels.shape)} do not match logits {tuple(logits.shape)}")
    loss = _CrossEntropy.apply(
        x,
        y.contiguous(),
        float(logit_scale),
        softcap,
        ignore_index,
        reduction,
        impl,
        inplace_backward,
        block_size,
        chunk_size,
    )
    return loss.view(labels.shape) if reduction == "none" else loss


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor, **kwargs):
    """(Σℓ over non-ignored tokens, n_valid) — for per-class eval losses summed across batches."""
    n_valid = (labels != kwargs.get("ignore_index", -100)).sum()
    return cross_entropy(logits, labels, reduction="sum", **kwargs), n_valid
