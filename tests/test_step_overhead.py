"""A training step's bookkeeping (adapter norms for the metrics, the finite-weights check, gradient
clipping and Adam) costs a fixed number of device ops and waits for the device a fixed number of
times, however many adapters there are: on a GPU each op is a launch and each wait a stall, and
LoRA on every linear of an 8B model has 448 adapter matrices. The norms are held to float64 SVDs
of the dense products, the foreach optimizer to torch-optimi's per-parameter loop (as the
reference trainer runs it), the finite check to its elementwise definition."""

from __future__ import annotations

import warnings
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cap_common.adapters import factors
from cap_common.models.pipeline import build_pipeline_layers
from cap_train.loss import PipelineLoss
from cap_train.optim import ClippedAdam, all_finite
from cap_train.outputs import adapter_norms
from tests.test_models import batch, make_spec, model_dir, randomize_adapters, run  # noqa: F401 (fixture)

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")),
]


def test_norms_match_dense_svd():
    g = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    pairs = [
        (rand(12, 4), rand(4, 9), 0.5),  # two of one shape: one batch
        (rand(12, 4), rand(4, 9), 2.0),
        (torch.zeros(12, 4), rand(4, 9), 1.0),  # LoRA at init: B = 0
        (rand(7, 1), rand(1, 30), -3.0),  # rank 1; the sign of s does not change a norm
        (rand(20, 8) @ torch.diag(torch.tensor([1e3, 1, 1, 1, 1e-3, 1, 1, 1])), rand(8, 20), 1.0),
        (rand(16, 6)[:, [0, 1, 2, 0, 1, 2]], rand(6, 5), 1.0),  # rank-deficient U
    ]
    got = factors.norms(pairs)
    for (U, V, s), (frobenius, spectral) in zip(pairs, got):
        W = s * U.double() @ V.double()
        assert frobenius == pytest.approx(float(torch.linalg.matrix_norm(W)), rel=1e-9, abs=1e-12)
        assert spectral == pytest.approx(float(torch.linalg.matrix_norm(W, 2)), rel=1e-9, abs=1e-12)
    assert factors.norms([]) == []


class _Ops(TorchDispatchMode):
    """Counts the aten ops dispatched inside it (on a GPU, each is a launch or more)."""

    def __init__(self):
        super().__init__()
        self.count = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def _bookkeeping(model_dir, tmp_path, device, layers_to_transform, **keys):
    """Ops and device waits of one step's bookkeeping on a tiny model trained with these keys."""
    torch.manual_seed(0)
    spec = make_spec(model_dir("llama"), tmp_path, layers_to_transform=layers_to_transform, **keys)
    layers = build_pipeline_layers(spec, device, loss_fn=PipelineLoss())
    randomize_adapters(layers)
    model = torch.nn.ModuleList(layers)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = ClippedAdam(params, lr=1e-3, foreach=True, max_grad_norm=1e-3)  # clipping binds
    ids, cc = batch()
    run(layers, ids.to(device), cc.to(device)).backward()
    optimizer.step()  # the first step creates the Adam state, one tensor per parameter
    ops = _Ops()
    with warnings.catch_warnings(record=True) as waits:
        warnings.simplefilter("always")
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("warn")  # a warning for every op that waits for the GPU
        try:
            with ops:
                norms = adapter_norms(model)
                finite = all_finite(params, torch.device(device))
                optimizer.step()
        finally:
            if device == "cuda":
                torch.cuda.set_sync_debug_mode(0)
    assert bool(finite) and len(norms) > 0
    syncs = [w for w in waits if "synchroniz" in str(w.message)]
    return ops.count, len(syncs), len(params)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "keys",
    [
        pytest.param(dict(lora_rank=4), id="lora-every-linear"),
        pytest.param(dict(use_control_adapters=True, control_adapter_type="full"), id="control"),
    ],
)
def test_step_bookkeeping_does_not_grow_with_the_adapters(model_dir, tmp_path, device, keys):  # noqa: F811
    one, one_syncs, n_one = _bookkeeping(model_dir, tmp_path / "a", device, [0], **keys)
    every, every_syncs, n_every = _bookkeeping(model_dir, tmp_path / "b", device, "0:3", **keys)
    assert n_every >= 4 * n_one  # four layers against one
    assert every == one, {k: (one[k], every[k]) for k in one.keys() | every.keys() if one[k] != every[k]}
    assert one["_local_scalar_dense"] <= 1  # ‖g‖ for clipping and the log; nothing per adapter
    if device == "cuda":
        assert every_syncs == one_syncs <= 2  # ‖g‖, and the norms' one copy to the host


def test_foreach_adam_is_the_per_parameter_loop():
    """float32: bit for bit, with clipping binding on some steps and not others."""
    g = torch.Generator().manual_seed(0)
    shapes = [(16, 4), (4, 24), (7,), (4, 4)]
    start = [torch.randn(s, generator=g) for s in shapes]
    sides = {}
    for foreach in (False, True):
        params = [torch.nn.Parameter(t.clone()) for t in start]
        opt = ClippedAdam(params, lr=1e-2, betas=(0.9, 0.99), eps=1e-6, foreach=foreach, max_grad_norm=3.0)
        gen = torch.Generator().manual_seed(1)
        norms = []
        for step in range(4):
            for p in params:
                p.grad = (0.2 + step) * torch.randn(p.shape, generator=gen)
            opt.step()
            norms.append(opt.grad_norm)
        sides[foreach] = params, norms
    (loop, loop_norms), (fused, fused_norms) = sides[False], sides[True]
    assert loop_norms == fused_norms and loop_norms[0] < 3.0 < loop_norms[-1]
    assert all(torch.equal(a, b) for a, b in zip(loop, fused))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_all_finite(bad):
    tensors = [torch.randn(5, 3), torch.full((4,), 3e38), torch.randn(6).bfloat16()]
    assert bool(all_finite(tensors, torch.device("cpu")))
    for i in range(len(tensors)):
        broken = [t.clone() for t in tensors]
        broken[i].view(-1)[-1] = bad
        assert not bool(all_finite(broken, torch.device("cpu")))
    assert bool(all_finite([], torch.device("cpu")))
