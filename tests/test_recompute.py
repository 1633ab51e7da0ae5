"""activation_checkpointing modes (common/models/recompute.py) give the gradients of no
checkpointing, for every family cap knows: the whole pipeline (embedding → decoder layers → fused
LM head + loss) run forward and backward with adapter dropout on, every trainable gradient
compared with the run without checkpointing. 'selective' keeps the matmul and attention outputs
and nothing else of the layer's saved tensors; 'offload' keeps the layer input off the autograd
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


def test_selective_keeps_only_matmul_and_attention_outputs(model_dir, tmp_path):  # noqa: F811
    """Saved tensor bytes of one decoder layer's forward: selective < 0.6 × none; full ≈ the input only."""
    spec = make_spec(model_dir("llama"), tmp_path, use_control_adapters=True)
    layers = build_pipeline_layers(spec)
    ids, cc = batch()
    with torch.no_grad():
        x = layers[0]((ids, cc))
    hidden = x[0].detach().requires_grad_()
    saved = {}
    for mode in (None, "selective", "full"):
        layer = layers[1]
        layer.recompute = mode
        sizes = {}

        def pack(t, sizes=sizes):
            sizes[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            layer((hidden, *x[1:]))
        saved[mode] = sum(sizes.values())
    assert saved["selective"] < 0.6 * saved[None]
    assert saved["full"] <= hidden.untyped_storage().nbytes() + 1024


def test_the_config_key_and_the_layers_it_selects():
    assert [recompute.layer_mode(3, i) for i in range(7)] == ["full", None, None, "full", None, None, "full"]
    assert recompute.layer_mode(True, 5) == "full" and recompute.layer_mode(False, 0) is None
    assert recompute.layer_mode("offload", 4) == "offload"
    for good in (True, False, "selective", "offload", 1, 4):
        assert checkpointing_spec(good) == good
    for bad in ("partial", 0, -1, 1.5, [1]):
        with pytest.raises(Invalid, match="'selective', 'offload' or a whole number"):
            checkpointing_spec(bad)
