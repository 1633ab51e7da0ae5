"""The last pipeline stage's loss: token-mean cross entropy, fused with the LM head (kernels/).

Training: L = Σ_t ℓ_t / n over positions whose label is not −100 (a scalar per micro batch).
Eval: the vector [Σℓ, n, Σℓ₊, n₊, Σℓ₋, n₋] over all positions and per control class, so the
trainer can form exact token means per class across micro batches and ranks.
"""

from __future__ import annotations

import torch

from cap_kernels.fused_linear_ce import fused_linear_cross_entropy

IGNORE = -100


class PipelineLoss:
    """loss_fn of the LM-head layer: (hidden [B,T,H], weight [V,H], labels, classes, scale, softcap)."""

    def __init__(self):
        self.eval_stats = False

    def __call__(self, hidden, weight, labels, classes, logit_scale=1.0, softcap=None) -> torch.Tensor:
        with torch.profiler.record_function("cap::loss"):  # what cap_train/profile.py counts as the loss
            return self._loss(hidden, weight, labels, classes, logit_scale, softcap)

    def _loss(self, hidden, weight, labels, classes, logit_scale, softcap) -> torch.Tensor:
        if not self.eval_stats:
            return fused_linear_cross_entropy(hidden, weight, labels, logit_scale=logit_scale, softcap=softcap)
        # one pass over the LM head: ℓ per position (0 where ignored), then the sums per class
        losses = fused_linear_cross_entropy(
            hidden, weight, labels, logit_scale=logit_scale, softcap=softcap, reduction="none"
        ).double()
        out = []
        for c in (1, -1):
            counted = (labels != IGNORE) & (classes == c)
            out += [torch.where(counted, losses, 0.0).sum(), counted.sum().double()]
        pos_s, pos_n, neg_s, neg_n = out
        return torch.stack([pos_s + neg_s, pos_n + neg_n, pos_s, pos_n, neg_s, neg_n])
