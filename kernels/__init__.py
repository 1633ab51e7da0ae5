"""Memory-lean cross-entropy loss: a Triton kernel (CUDA, or TRITON_INTERPRET=1) and a torch path.

    cross_entropy(logits [..., V], labels [...])           → mean CE over labels != ignore_index
    cross_entropy_sum(logits, labels)                      → (Σ CE, n_valid)
    fused_linear_cross_entropy(hidden [..., H], W [V, H], labels [...]) → CE(h·Wᵀ, y), chunked

Importing this package never needs triton or a GPU.
"""
from kernels.cross_entropy import cross_entropy, cross_entropy_sum
from kernels.fused_linear_ce import fused_linear_cross_entropy

__all__ = ["cross_entropy", "cross_entropy_sum", "fused_linear_cross_entropy"]
