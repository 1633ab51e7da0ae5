"""MFU's FLOP count against torch's own FLOP counter on transformers models: full fine-tune, a frozen
base trained from layer k (backward only from there on), and an MoE that uses 2 of 4 experts."""

from __future__ import annotations

import pytest
import torch
import transformers
from torch.utils.flop_counter import FlopCounterMode

from cap_train.mfu import cuda_peak_flops, flops_per_token, measured_peak_flops

T = 32


def tiny(model_type: str):
    common = dict(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=96,
        num_hidden_layers=3,
        vocab_size=160,
        max_position_embeddings=T,
        tie_word_embeddings=False,
    )
    if model_type == "mixtral":
        config = transformers.MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2)
    else:
        config = transformers.LlamaConfig(**common)
    config._attn_implementation = "eager"
    config._experts_implementation = "eager"  # a loop of F.linear per expert, which the counter sees
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).float(), config


def counted_flops(model, full: bool, first: int) -> float:
    """FLOPs torch counts for one forward + backward of a [1, T] batch."""
    for p in model.parameters():
        p.requires_grad_(full)
    if not full:  # a frozen base with something to train from layer `first` on: gradients start there
        model.model.layers[first].register_forward_pre_hook(
            lambda _m, args, kwargs: (
                ((args[0].detach().requires_grad_(),) + args[1:], kwargs)
                if args
                else (args, {**kwargs, "hidden_states": kwargs["hidden_states"].detach().requires_grad_()})
            ),
            with_kwargs=True,
        )
    ids = torch.randint(0, model.config.vocab_size, (1, T))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, labels=ids).loss.backward()
    return counter.get_total_flops()


@pytest.mark.parametrize(
    "model_type,full,first",
    [("llama", True, 0), ("llama", False, 0), ("llama", False, 2), ("mixtral", True, 0), ("mixtral", False, 1)],
)
def test_flops_per_token_matches_torch_flop_counter(model_type, full, first):
    model, config = tiny(model_type)
    want = counted_flops(model, full, first) / T
    got = flops_per_token(config, T, full, first)
    assert got == pytest.approx(want, rel=1e-9)  # an MoE token passes exactly top-k experts


def test_peaks():
    assert cuda_peak_flops("NVIDIA H100 80GB HBM3", torch.bfloat16) == 989e12
    assert cuda_peak_flops("NVIDIA H100 PCIe", torch.bfloat16) == 756e12
    assert cuda_peak_flops("NVIDIA A100-SXM4-80GB", torch.float32) == 156e12
    assert cuda_peak_flops("Some Future GPU", torch.bfloat16) is None
    state = torch.get_rng_state()
    assert 1e8 < measured_peak_flops(torch.float32, torch.device("cpu")) < 1e14
    assert torch.equal(torch.get_rng_state(), state)  # a resumed run's RNG streams stay as saved
