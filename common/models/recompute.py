"""Activation checkpointing of one decoder layer (config key activation_checkpointing).

    true / 1     'full': keep only the layer's input; recompute the whole layer in backward
    N > 1        'full' on every N-th layer (index % N == 0), nothing on the others
    'selective'  keep what the base model's matmuls and attention return, recompute the cheap ops
                 between them (norms, rotary, activation function, products, and the adapters'
                 low-rank matmuls): near the speed of no checkpointing at a fraction of its memory
    'offload'    'full', with the kept input in host memory (pinned on CUDA) until backward needs it
    false        autograd keeps everything
Every mode computes the same gradients as no checkpointing (tests/test_recompute.py); dropout masks
are the same in the recomputation (torch's checkpoint restores the RNG state).
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

_aten = torch.ops.aten
# The ops whose outputs 'selective' keeps: every matmul form a linear layer or attention dispatches to.
KEPT_OPS = frozenset(
    getattr(_aten, name).default
    for name in (
        "mm",
        "addmm",
        "bmm",
        "baddbmm",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
    )
    if hasattr(_aten, name)
)


def layer_mode(setting: bool | str | int, index: int) -> str | None:
    """What decoder layer `index` does under the config's activation_checkpointing."""
    if setting is True:
        return "full"
    if setting is False:
        return None
    if isinstance(setting, int):
        return "full" if index % setting == 0 else None
    return setting


# 'selective' recomputes a low-rank matmul (an adapter's ·Bᵀ, inner dimension r): it costs r
# multiply-adds per output element, as cheap to redo as a norm, while keeping its [T, H] output
# would cost as much memory as keeping a base projection's.
LOW_RANK = 64


def _low_rank(a: torch.Tensor, b: torch.Tensor) -> bool:
    """a [M,K]·b [K,N] with K ≤ LOW_RANK and K ≤ N/4."""
    inner, width = a.shape[-1], b.shape[-1]
    return inner <= LOW_RANK and 4 * inner <= width


def _keep_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    if op not in KEPT_OPS:
        return CheckpointPolicy.PREFER_RECOMPUTE
    if op == _aten.mm.default and _low_rank(args[0], args[1]):
        return CheckpointPolicy.PREFER_RECOMPUTE
    if op == _aten.addmm.default and _low_rank(args[1], args[2]):
        return CheckpointPolicy.PREFER_RECOMPUTE
    return CheckpointPolicy.MUST_SAVE


def run(fn: Callable, mode: str, hidden: torch.Tensor, *rest):
    """fn(hidden, *rest) under `mode` ('full', 'selective' or 'offload')."""
    if mode == "full":
        return checkpoint(fn, hidden, *rest, use_reentrant=False)
    if mode == "selective":
        context = functools.partial(create_selective_checkpoint_contexts, _keep_matmuls)
        return checkpoint(fn, hidden, *rest, use_reentrant=False, context_fn=context)
    if mode == "offload":
        # The reentrant form saves exactly its inputs with save_for_backward, so the hooks move just
        # the layer input to host memory. It needs an input that requires grad for the layer's
        # parameters to get theirs (the first layer's input may not).
        if not hidden.requires_grad:
            hidden = hidden.detach().requires_grad_()
        with torch.autograd.graph.save_on_cpu(pin_memory=hidden.is_cuda):
            return checkpoint(fn, hidden, *rest, use_reentrant=True)
    raise ValueError(f"unknown checkpointing mode {mode!r}")
