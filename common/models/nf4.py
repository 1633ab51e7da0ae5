"""Frozen 4-bit (nf4) linears for QLoRA and 4-bit control adapters.

bitsandbytes stores and quantizes the weight (Params4bit: nf4, blocks of 64, double quantization),
and cap does the matmul itself, the same way in training and in eval:

    y = x·deq(W)ᵀ (+ b),    ∂L/∂x = ∂L/∂y · deq(W)        (W frozen: no gradient of its own)

with deq(W) rebuilt in backward rather than kept, so nothing of W's size is saved for it.

Why not bitsandbytes' own Linear4bit.forward: on a CPU with AVX512-BF16, one forward in eval mode
without grad (cap-train's eval) repacks the weight in place for an inference-only kernel, and every
later forward takes that kernel, which has no autograd: training after an eval then got no
gradient through any 4-bit weight (QLoRA on q_proj/v_proj trained nothing at all). This module
never calls that forward, so what a step computes does not depend on what ran before it.
"""

from __future__ import annotations

import bitsandbytes as bnb
import torch
import torch.nn.functional as F
from bitsandbytes.functional import dequantize_4bit


def dequantized(weight: bnb.nn.Params4bit) -> torch.Tensor:
    """deq(W) [out, in] in the dtype W was quantized from."""
    return dequantize_4bit(weight.data, weight.quant_state)


class _Linear4bitFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: bnb.nn.Params4bit) -> torch.Tensor:
        ctx.weight = weight
        return F.linear(x, dequantized(weight).to(x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad @ dequantized(ctx.weight).to(grad.dtype), None


class Linear4bit(bnb.nn.Linear4bit):
    """bitsandbytes' Linear4bit (same parameters, state dict and quantization on .to(device)) with
    the forward above: x is cast to compute_dtype, the output back to x's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        y = _Linear4bitFn.apply(x.to(self.compute_dtype or dtype), self.weight)  # no graph without grad
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(dtype)


def linear4bit(weight: torch.Tensor, bias: torch.Tensor | None, compute_dtype: torch.dtype) -> Linear4bit:
    """A frozen Linear4bit holding `weight` [out, in] (and `bias` [out]), not yet quantized: moving it
    with .to(device) quantizes it."""
    out_features, in_features = weight.shape
    q = Linear4bit(
        in_features,
        out_features,
        bias=bias is not None,
        compute_dtype=compute_dtype,
        compress_statistics=True,
        quant_type="nf4",
        device="meta",
    )
    q.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=True, quant_type="nf4")
    if bias is not None:
        q.bias = torch.nn.Parameter(bias, requires_grad=False)
    return q.requires_grad_(False)
