"""Shared helpers for the cap-export tests (no tests here): random Control Adapters saved as
training writes them, and an independent reference of "the adapter as trained" — transformers'
model with forward hooks that add x·Dᵀ to each writer's (or block's) output, D the dense W' built
here in float64 from the saved tensors (no code from cap_common.adapters.factors)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from cap_common.adapters.io import control_tensors, save_adapter
from cap_common.models import FAMILIES


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny models gain nothing from threads, and on a loaded 2-core machine OpenMP's waiting makes
    each forward ~100× slower; each test runs on one thread and restores the setting after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


H = 64
RANK = 4
ALPHA = 8.0
LAYERS = [1, 3]
TYPES = ("full", "symmetrise", "antisymmetrise", "spectral")


def random_states(
    adapter_type: str, seed: int = 0, layers=LAYERS, hidden: int = H, rank: int = RANK, size: float = 0.15
) -> dict[int, dict[str, torch.Tensor]]:
    """Non-zero adapter tensors per layer, as ControlAdapter.state() holds them (float32)."""
    g = torch.Generator().manual_seed(seed)
    states = {}
    for layer in layers:
        if adapter_type == "spectral":
            Q = torch.linalg.qr(torch.randn(hidden, rank, generator=g, dtype=torch.float64)).Q.float()
            states[layer] = {"Q": Q, "S": torch.randn(rank, generator=g) * 0.5}
        else:
            states[layer] = {
                "A": torch.randn(rank, hidden, generator=g) * size,
                "B": torch.randn(hidden, rank, generator=g) * size,
            }
    return states


def save_control(
    folder: Path,
    adapter_type: str,
    target: str = "writers",
    seed: int = 0,
    layers=LAYERS,
    hidden: int = H,
    rank: int = RANK,
    alpha: float = ALPHA,
    cap_keys: bool = True,
) -> Path:
    """An epoch<N>-style folder; cap_keys=False writes it as qlora-pipe-lite did (no cap keys)."""
    states = random_states(adapter_type, seed, layers, hidden, rank)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": [],
        "layers_to_transform": list(layers),
    }
    if cap_keys:
        config.update(control_adapter_type=adapter_type, control_adapter_target=target)
    save_adapter(folder, control_tensors(states), config)
    return Path(folder)


def dense_w(state: dict, adapter_type: str, scale: float, direction: str = "forward") -> torch.Tensor:
    """W' [H,H] in float64 from the saved tensors, by the definitions (docs/math.md, section 1)."""
    s = {k: v.double() for k, v in state.items()}
    if adapter_type == "spectral":
        Q, S = s["Q"], s["S"]
        sign = -1.0 if direction == "inverse" else 1.0
        W = Q @ torch.diag(torch.exp(sign * S) - 1) @ Q.T
        return -W if direction == "negate" else W
    W = scale * s["B"] @ s["A"]
    if adapter_type == "symmetrise":
        W = (W + W.T) / 2
    elif adapter_type == "antisymmetrise":
        W = (W - W.T) / 2
    if direction == "inverse":
        eye = torch.eye(W.shape[0], dtype=W.dtype)
        return torch.linalg.inv(eye + W) - eye
    return -W if direction == "negate" else W


_MODELS = {}


def hf_model(folder: Path, family: str) -> transformers.PreTrainedModel:
    """The tiny model in float32, eval mode, cached per folder (never modified by the tests)."""
    key = str(folder)
    if key not in _MODELS:
        _MODELS[key] = transformers.AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32, attn_implementation=FAMILIES[family].attention
        ).eval()
    return _MODELS[key]


# The modules that write into the residual stream, whichever of these a decoder layer has.
WRITERS = (
    "self_attn.o_proj",
    "mlp.down_proj",
    "mlp.experts",
    "mlp.shared_experts.down_proj",
    "block_sparse_moe.experts",
)


def writers(block) -> list[str]:
    names = {name for name, _ in block.named_modules()}
    return [path for path in WRITERS if path in names]


@torch.no_grad()
def reference_logits(
    folder: Path,
    family: str,
    states: dict,
    adapter_type: str,
    target: str,
    ids: torch.Tensor,
    direction: str = "forward",
    scale: float = ALPHA / RANK,
) -> torch.Tensor:
    """Logits of the base model with the adapter applied (to every token) where it was trained."""
    model = hf_model(folder, family)
    hooks = []
    try:
        for layer, state in states.items():
            D = dense_w(state, adapter_type, scale, direction).float()
            block = model.model.layers[layer]
            if target == "writers":
                for path in writers(block):
                    hooks.append(
                        block.get_submodule(path).register_forward_hook(lambda m, args, out, D=D: out + out @ D.T)
                    )
            else:

                def block_hook(m, args, kwargs, out, D=D):
                    h = args[0] if args else kwargs["hidden_states"]
                    y = out[0] if isinstance(out, tuple) else out
                    y = y + (y - h) @ D.T
                    return (y, *out[1:]) if isinstance(out, tuple) else y

                hooks.append(block.register_forward_hook(block_hook, with_kwargs=True))
        return model(input_ids=ids).logits.float()
    finally:
        for hook in hooks:
            hook.remove()


def token_ids(seed: int = 0, length: int = 20, vocab: int = 512) -> torch.Tensor:
    return torch.randint(3, vocab, (2, length), generator=torch.Generator().manual_seed(seed))
