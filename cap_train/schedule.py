"""Learning-rate schedule: warmup, then constant or cosine decay.

t counts optimizer steps from 1.
- warmup 'rms_ratio' (the reference's automatic warmup tied to Adam's β₂):
      lr_t = lr · √((1 − β₂ᵗ) / (1 + β₂ᵗ))
  which rises from ≈ lr·√((1−β₂)/2) towards lr as the second-moment estimate fills up.
- warmup 'linear': lr_t = lr · t / W for t ≤ W, W = ceil(warmup_fraction · total_steps).
- lr_scheduler 'cosine' (after any linear warmup):
      lr_t = min_lr + (lr − min_lr) · ½(1 + cos(π · p)),  p = (t − W) / (total − W) ∈ [0, 1]
  (the rms_ratio factor multiplies it, as warmup and decay act on different time scales).
"""

from __future__ import annotations

import math


def lr_at(
    step: int,
    total_steps: int,
    *,
    lr: float,
    beta2: float,
    warmup: str = "rms_ratio",
    warmup_fraction: float = 0.0,
    lr_scheduler: str = "constant",
    min_lr: float = 0.0,
) -> float:
    """Learning rate for optimizer step `step` (1-based) of `total_steps`."""
    t = max(step, 1)
    warm_steps = math.ceil(warmup_fraction * total_steps) if warmup == "linear" else 0
    if lr_scheduler == "cosine" and total_steps > warm_steps:
        p = min(max(t - warm_steps, 0) / (total_steps - warm_steps), 1.0)
        base = min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * p))
    else:
        base = lr
    if warmup == "rms_ratio":
        b = beta2**t
        return base * math.sqrt((1.0 - b) / (1.0 + b))
    if warmup == "linear" and t <= warm_steps:
        return lr * t / warm_steps
    return base


def lr_lambda(cfg, total_steps: int):
    """A torch LambdaLR multiplier (of cfg.lr) for step index s (0-based, = optimizer step s+1)."""

    def factor(s: int) -> float:
        return (
            lr_at(
                s + 1,
                total_steps,
                lr=cfg.lr,
                beta2=cfg.beta2,
                warmup=cfg.warmup,
                warmup_fraction=cfg.warmup_fraction,
                lr_scheduler=cfg.lr_scheduler,
                min_lr=cfg.min_lr,
            )
            / cfg.lr
        )

    return factor
