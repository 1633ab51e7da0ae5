"""Model FLOP utilization: the matmul FLOPs a training step needs by the model's shapes, over what
the devices could do (the convention of PaLM's appendix and nanoGPT's trainer).

Per token, with N_l the matmul weights of decoder layer l (attention projections, the MLP with
only the active experts of an MoE, the router), N_head = vocab · hidden and A_l = 4 · heads ·
head_dim · T the forward FLOPs of QKᵀ and A·V at sequence length T:

    forward                2 · N_l + A_l      every layer, and 2 · N_head
    backward, inputs       2 · N_l + 2 · A_l  layers from the first trained one on, and 2 · N_head
    backward, weights      2 · N_l            full fine-tune only (and 2 · N_head)

so a full fine-tune costs 6N + 12·L·heads·head_dim·T per token and a frozen base trained from
layer 0 costs 4N + 12·L·heads·head_dim·T. Adapters, norms, rotary and the recomputation of
activation checkpointing are not counted (model FLOPs, not hardware FLOPs); masked attention
positions are counted, as every dense kernel computes them.
"""

from __future__ import annotations

import time

import torch

# Dense tensor-core peaks in TFLOP/s per GPU (no sparsity), (16-bit, float32 as TF32), by name.
CUDA_PEAK_TFLOPS = [
    ("H200", 989.0, 494.0),
    ("H100 PCIe", 756.0, 378.0),
    ("H100", 989.0, 494.0),
    ("H800", 989.0, 494.0),
    ("GH200", 989.0, 494.0),
    ("B200", 2250.0, 1100.0),
    ("A100", 312.0, 156.0),
    ("A800", 312.0, 156.0),
    ("L40S", 362.0, 183.0),
    ("L40", 181.0, 90.5),
    ("L4", 121.0, 60.0),
    ("A10G", 70.0, 35.0),
    ("A10", 125.0, 62.5),
    ("A40", 150.0, 74.8),
    ("A6000", 155.0, 77.4),
    ("RTX 6000 Ada", 365.0, 182.0),
    ("4090", 165.0, 82.6),
    ("3090", 71.0, 35.6),
    ("V100", 125.0, 15.7),
    ("T4", 65.0, 8.1),
]


def layer_matmul_params(config) -> int:
    """N_l of one decoder layer from a transformers config (MoE: the experts a token uses)."""
    d = config.hidden_size
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    attention = d * heads * head_dim * 2 + d * kv_heads * head_dim * 2
    experts = getattr(config, "num_local_experts", None)
    active = getattr(config, "num_experts_per_tok", 1) if experts else 1
    mlp = 3 * d * config.intermediate_size * active + (d * experts if experts else 0)
    return attention + mlp


def flops_per_token(config, seq_len: int, full_fine_tune: bool, first_trained_layer: int = 0) -> float:
    """Training FLOPs per token (forward + backward) by the equations above."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    n_layer = layer_matmul_params(config)
    attn = 4 * heads * head_dim * seq_len
    n_head = config.vocab_size * config.hidden_size
    layers = config.num_hidden_layers
    first = 0 if full_fine_tune else min(first_trained_layer, layers)
    trained = layers - first
    total = layers * (2 * n_layer + attn) + trained * (2 * n_layer + 2 * attn) + 4 * n_head
    if full_fine_tune:
        total += layers * 2 * n_layer + 2 * n_head
    return float(total)


def cuda_peak_flops(name: str, dtype: torch.dtype) -> float | None:
    """A GPU's dense peak by its name (torch.cuda.get_device_name), or None when it is not listed."""
    for key, half, single in CUDA_PEAK_TFLOPS:
        if key.lower() in name.lower():
            return (single if dtype == torch.float32 else half) * 1e12
    return None


def measured_peak_flops(dtype: torch.dtype, device: torch.device, seconds: float = 0.05) -> float:
    """What one square matmul reaches here, best of a few, with the threads this process uses."""
    size = 1024 if dtype == torch.float32 else 512
    # A generator of its own: the run's RNG streams (dropout, resume's saved states) stay untouched.
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.rand(size, size, device=device, generator=g).to(dtype)
    b = torch.rand(size, size, device=device, generator=g).to(dtype)
    torch.mm(a, b)
    best = float("inf")
    deadline = time.perf_counter() + seconds
    for _ in range(10):
        t0 = time.perf_counter()
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
        if time.perf_counter() > deadline:
            break
    return 2 * size**3 / best


def device_peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """(peak FLOP/s of one process's device, where the figure comes from)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = cuda_peak_flops(name, dtype)
        if peak:
            return peak, f"{name} datasheet"
        return measured_peak_flops(dtype, device), f"{name} measured"
    return measured_peak_flops(dtype, device), "CPU matmul measured at start"
