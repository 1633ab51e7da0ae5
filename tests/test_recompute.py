"""activation_checkpointing modes (common/models/recompute.py) give the gradients of no
checkpointing, for every family cap knows: the whole pipeline (embedding → decoder layers → fused
LM head + loss) run forward and backward with adapter dropout on, every trainable gradient
compared with the run without checkpointing. 'selective' keeps the base matmuls' and attention's
outputs and nothing else, by the allocator's count; 'offload' keeps the layer input off the autograd
graph's own storage."""

from __future__ import annotations

import pytest
import torch

from cap_common.config import Invalid, checkpointing_spec
from cap_common.models import recompute
from cap_common.models.pipeline import build_pipeline_layers
from cap_train.loss import PipelineLoss
from tests import assets
from tests.test_models import batch, make_spec, model_dir, randomize_adapters, run  # noqa: F401 (fixture)

MODES = [True, "selective", "offload", 2]


def grads(folder, tmp_path, mode, **keys):
    torch.manual_seed(0)
    spec = make_spec(folder, tmp_path, activation_checkpointing=mode, lora_dropout=0.2, **keys)
    layers = build_pipeline_layers(spec, loss_fn=PipelineLoss())
    randomize_adapters(layers)
    ids, cc = batch()
    torch.manual_seed(1)  # the dropout masks
    loss = run(layers, ids, cc)
    loss.backward()
    named = {f"{i}.{n}": p for i, m in enumerate(layers) for n, p in m.named_parameters() if p.requires_grad}
    assert named and all(p.grad is not None for p in named.values())
    return loss.detach(), {n: p.grad for n, p in named.items()}


@pytest.mark.parametrize("family", list(assets.FAMILIES))
def test_every_mode_gives_the_gradients_of_no_checkpointing(family, model_dir, tmp_path):  # noqa: F811
    keys = dict(use_control_adapters=True, control_adapter_target="writers") if family != "qwen3" else {}
    want_loss, want = grads(model_dir(family), tmp_path, False, **keys)
    for mode in MODES:
        loss, got = grads(model_dir(family), tmp_path, mode, **keys)
        assert torch.equal(loss, want_loss), mode
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7, msg=f"{mode} {name}")


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_compiled_layers_give_the_gradients_of_eager(family, model_dir, tmp_path):  # noqa: F811
    """compile_layers = true (torch.compile per decoder layer, common/models/pipeline.compile_layer)
    under no checkpointing, full and selective: the eager run's loss and every gradient, to the
    rounding of a reordered float32 sum."""
    torch._dynamo.reset()
    keys = dict(use_control_adapters=True, control_adapter_target="writers")
    want_loss, want = grads(model_dir(family), tmp_path, False, **keys)
    for mode in (False, True, "selective"):
        loss, got = grads(model_dir(family), tmp_path, mode, compile_layers=True, **keys)
        torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=0, msg=str(mode))
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=f"{mode} {name}")
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # suppress_errors could hide a fallback


def held_by_forward(fn) -> tuple[int, object]:
    """(bytes fn() leaves allocated, its result): the bytes by the CPU allocator's own count
    (allocated − freed per op, as torch.profiler records it); unlike saved-tensor hooks this also
    sees what selective checkpointing caches."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    return sum(e.self_cpu_memory_usage for e in prof.key_averages()), out


def test_selective_keeps_only_base_matmul_and_attention_outputs(model_dir, tmp_path):  # noqa: F811
    """What one decoder layer's forward newly allocates and leaves for its backward, at T = 256
    (llama: H 64, q 64 wide, k/v 32, gate/up 128, rank-4 control adapter on both writers). Per
    token, in floats, besides the layer input (already allocated) and the output:
    none       everything autograd saves;
    selective  q, k, v 64+32+32 + attention output 64 and logsumexp 4 + o_proj 64 + gate, up
               128+128 + down_proj 64 + the adapters' x·Aᵀ 2×4 = 588 (their ·Bᵀ recomputed);
    full       nothing: the kept input is the caller's tensor."""
    spec = make_spec(model_dir("llama"), tmp_path, use_control_adapters=True, control_adapter_target="writers")
    layers = build_pipeline_layers(spec)
    T = 256
    ids = torch.randint(3, 200, (1, T))
    cc = torch.ones(1, T, dtype=torch.int8)
    with torch.no_grad():
        x = layers[0]((ids, cc))
    hidden = x[0].detach().requires_grad_()
    held = {}
    for mode in (None, "selective", "full"):
        layers[1].recompute = mode
        held[mode], out = held_by_forward(lambda: layers[1]((hidden, *x[1:])))
        held[mode] -= out[0].untyped_storage().nbytes()  # the output, not held for the backward
        out[0].sum().backward()  # the cache is used, so the count above was of live tensors
    per_token = {mode: held[mode] / (4 * T) for mode in held}
    assert per_token["full"] < 8
    assert per_token["selective"] == pytest.approx(128 + 64 + 4 + 64 + 256 + 64 + 8, rel=0.05)
    assert per_token["selective"] < 0.75 * per_token[None]


def test_the_config_key_and_the_layers_it_selects():
    assert [recompute.layer_mode(3, i) for i in range(7)] == ["full", None, None, "full", None, None, "full"]
    assert recompute.layer_mode(True, 5) == "full" and recompute.layer_mode(False, 0) is None
    assert recompute.layer_mode("offload", 4) == "offload"
    for good in (True, False, "selective", "offload", 1, 4):
        assert checkpointing_spec(good) == good
    for bad in ("partial", 0, -1, 1.5, [1]):
        with pytest.raises(Invalid, match="'selective', 'offload' or a whole number"):
            checkpointing_spec(bad)
