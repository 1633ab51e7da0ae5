"""common/adapters: every number checked against an independent reference (float64 dense math,
PEFT's LoraLinear, a float64 full SVD)."""

import copy
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from cap_common.adapters import factors
from cap_common.adapters.control import ControlAdapter
from cap_common.adapters.io import (
    adapter_config_for,
    control_state_by_layer,
    control_tensors,
    load_adapter,
    save_adapter,
)
from cap_common.adapters.lora import LoraLinear, inject_lora
from cap_common.adapters.regularize import regularize_model_, regularize_pair_, regularize_spectral_
from cap_common.config import Config
from cap_common.errors import CapError

TYPES = ("full", "symmetrise", "antisymmetrise", "spectral")
H, R, ALPHA = 16, 4, 3.0
S = ALPHA / R


# ---------------------------------------------------------------- independent float64 references
def gram_schmidt(X: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns spanning X[:, :k] for each k (classical Gram–Schmidt, twice), float64."""
    X = X.double().clone()
    for j in range(X.shape[1]):
        for _ in range(2):
            X[:, j] -= X[:, :j] @ (X[:, :j].T @ X[:, j])
        X[:, j] /= X[:, j].norm()
    return X


def dense_w(adapter: ControlAdapter, sign: int = +1) -> torch.Tensor:
    """The H×H matrix the adapter applies for class `sign`, from its raw parameters, in float64."""
    if adapter.adapter_type == "spectral":
        Q = gram_schmidt(adapter.Q.detach())
        return Q @ torch.diag(torch.exp(sign * adapter.S.detach().double()) - 1) @ Q.T
    W = adapter.scale * adapter.B.detach().double() @ adapter.A.detach().double()
    W = {"full": W, "symmetrise": (W + W.T) / 2, "antisymmetrise": (W - W.T) / 2}[adapter.adapter_type]
    return sign * W


def reference_forward(adapter, h, delta, classes, dropped=None):
    """y' = h + Δ + c·W'·dropout(Δ) token by token in float64 (spectral: W'₋ for class −1)."""
    dropped = delta if dropped is None else dropped
    out = torch.empty(h.shape, dtype=torch.float64)
    for b in range(h.shape[0]):
        for t in range(h.shape[1]):
            c = int(classes[b, t])
            y = h[b, t].double() + delta[b, t].double()
            if c != 0:
                y = y + dense_w(adapter, c) @ dropped[b, t].double()
            out[b, t] = y
    return out


def random_adapter(adapter_type: str, dtype=torch.float32, seed: int = 0, **kw) -> ControlAdapter:
    """An adapter with random non-zero parameters (spectral Q deliberately not orthonormal)."""
    torch.manual_seed(seed)
    adapter = ControlAdapter(H, R, ALPHA, adapter_type, dtype=dtype, **kw)
    with torch.no_grad():
        if adapter_type == "spectral":
            adapter.Q.copy_(torch.randn(H, R))
            adapter.S.copy_(0.7 * torch.randn(R))
        else:
            adapter.A.copy_(0.3 * torch.randn(R, H))
            adapter.B.copy_(0.3 * torch.randn(H, R))
    return adapter


CLASSES = torch.tensor([[1, -1, 0, 1, 0, -1], [0, 0, -1, 1, 1, -1]])


# ---------------------------------------------------------------- ControlAdapter
def test_control_init():
    torch.manual_seed(0)
    a = ControlAdapter(64, 8, 4.0)
    assert a.A.shape == (8, 64) and a.B.shape == (64, 8) and not a.B.any()
    bound = 1 / math.sqrt(64)  # kaiming-uniform a=√5 on fan_in = H (PEFT's lora_A init)
    assert a.A.abs().max() <= bound and a.A.abs().max() > 0.8 * bound
    s = ControlAdapter(64, 8, 4.0, "spectral")
    assert s.Q.shape == (64, 8) and s.S.shape == (8,) and not s.S.any()
    torch.testing.assert_close(s.Q.T @ s.Q, torch.eye(8), atol=1e-6, rtol=0)
    x = torch.randn(2, 3, 64)
    classes = torch.tensor([[1, -1, 0]] * 2)
    assert torch.equal(a(x, classes), x) and torch.equal(s(x, classes), x)  # identity at init


@pytest.mark.parametrize("adapter_type", TYPES)
def test_control_forward_matches_dense_reference(adapter_type):
    adapter = random_adapter(adapter_type)
    torch.manual_seed(1)
    h, delta = torch.randn(2, 6, H), torch.randn(2, 6, H)
    out = h + adapter(delta, CLASSES.to(torch.int8))  # int8: the dataset's control_class dtype
    torch.testing.assert_close(out.double(), reference_forward(adapter, h, delta, CLASSES), atol=2e-5, rtol=1e-5)
    zero = CLASSES == 0
    assert torch.equal(adapter(delta, CLASSES)[zero], delta[zero])  # class 0: bitwise untouched
    assert not torch.allclose(out[~zero], (h + delta)[~zero])  # the others really changed


@pytest.mark.parametrize("adapter_type", TYPES)
def test_control_forward_bf16(adapter_type):
    adapter = random_adapter(adapter_type, dtype=torch.bfloat16)
    torch.manual_seed(1)
    h, delta = torch.randn(2, 6, H, dtype=torch.bfloat16), torch.randn(2, 6, H, dtype=torch.bfloat16)
    update = adapter(delta, CLASSES)
    assert update.dtype == torch.bfloat16
    ref = reference_forward(adapter, torch.zeros_like(h), delta, CLASSES)
    torch.testing.assert_close(update.double(), ref, atol=0.05, rtol=0.03)
    assert torch.equal(update[CLASSES == 0], delta[CLASSES == 0])


@pytest.mark.parametrize("adapter_type", TYPES)
def test_control_dropout_only_in_training(adapter_type):
    adapter = random_adapter(adapter_type, dropout=0.5)
    torch.manual_seed(1)
    delta = torch.randn(2, 6, H)
    adapter.eval()
    torch.testing.assert_close(
        adapter(delta, CLASSES).double(),
        reference_forward(adapter, torch.zeros_like(delta), delta, CLASSES),
        atol=2e-5,
        rtol=1e-5,
    )
    adapter.train()
    torch.manual_seed(7)
    out = adapter(delta, CLASSES)
    torch.manual_seed(7)
    dropped = torch.nn.functional.dropout(delta, 0.5, training=True)  # the same mask
    assert not torch.equal(dropped, delta)
    ref = reference_forward(adapter, torch.zeros_like(delta), delta, CLASSES, dropped=dropped)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-5)
    assert torch.equal(out[CLASSES == 0], delta[CLASSES == 0])


def test_spectral_minus_is_exact_inverse():
    adapter = random_adapter("spectral")  # raw Q not orthonormal: the forward uses orth(Q)
    v = torch.randn(3, 1, H)
    plus = adapter(v, torch.ones(3, 1, dtype=torch.long))  # (I + W'₊)·v
    back = adapter(plus, -torch.ones(3, 1, dtype=torch.long))  # (I + W'₋)·(I + W'₊)·v
    assert (plus - v).abs().max() > 0.1
    torch.testing.assert_close(back, v, atol=1e-5, rtol=0)
    eye = torch.eye(H, dtype=torch.float64)
    torch.testing.assert_close((eye + dense_w(adapter, -1)) @ (eye + dense_w(adapter, +1)), eye, atol=1e-12, rtol=0)


def test_spectral_trains_q_and_s():
    adapter = random_adapter("spectral")
    delta = torch.randn(2, 6, H)
    adapter(delta, CLASSES).square().sum().backward()
    assert adapter.Q.grad.abs().max() > 0 and adapter.S.grad.abs().max() > 0
    state = adapter.state()  # what is saved: an orthonormal Q
    torch.testing.assert_close(state["Q"].T @ state["Q"], torch.eye(R), atol=1e-5, rtol=0)
    fresh = ControlAdapter(H, R, ALPHA, "spectral")
    fresh.load_state(state)
    torch.testing.assert_close(fresh(delta, CLASSES), adapter(delta, CLASSES), atol=1e-5, rtol=0)


@pytest.mark.parametrize("adapter_type", TYPES)
def test_control_weight_and_norms(adapter_type):
    adapter = random_adapter(adapter_type)
    W = dense_w(adapter)
    torch.testing.assert_close(adapter.weight(), W, atol=1e-6, rtol=1e-6)
    sigma = torch.linalg.svdvals(W)
    norms = adapter.norms()
    assert norms["frobenius"] == pytest.approx(float(W.norm()), rel=1e-6)
    assert norms["spectral"] == pytest.approx(float(sigma[0]), rel=1e-6)


# ---------------------------------------------------------------- factors
@pytest.mark.parametrize("adapter_type", TYPES)
def test_control_weight_factors(adapter_type):
    adapter = random_adapter(adapter_type)
    state = {k: v.double() for k, v in adapter.state().items()}
    U, V = factors.control_weight_factors(state, adapter_type, S)
    k = 2 * R if adapter_type in ("symmetrise", "antisymmetrise") else R
    assert U.shape == (H, k) and V.shape == (k, H)
    torch.testing.assert_close(U @ V, dense_w(adapter), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("adapter_type", TYPES)
def test_inverse_factors_woodbury(adapter_type):
    adapter = random_adapter(adapter_type)
    state = {k: v.double() for k, v in adapter.state().items()}
    U, V = factors.control_weight_factors(state, adapter_type, S)
    U2, V2 = factors.inverse_factors(U, V)
    assert U2.shape == U.shape and V2.shape == V.shape
    eye = torch.eye(H, dtype=torch.float64)
    torch.testing.assert_close((eye + U @ V) @ (eye + U2 @ V2), eye, atol=1e-10, rtol=0)
    if adapter_type == "spectral":  # the closed form −S branch is the same inverse
        Q = gram_schmidt(state["Q"])  # orthonormal to float64 precision, for a 1e-10 comparison
        U, V = factors.spectral_factors(Q, state["S"], +1)
        U2, V2 = factors.inverse_factors(U, V)
        Um, Vm = factors.spectral_factors(Q, state["S"], -1)
        torch.testing.assert_close(Um @ Vm, U2 @ V2, atol=1e-10, rtol=0)
        torch.testing.assert_close(Um @ Vm, dense_w(adapter, -1), atol=1e-6, rtol=0)


def test_inverse_factors_singular():
    e = torch.zeros(H, 1, dtype=torch.float64)
    e[3] = 1
    with pytest.raises(CapError, match="singular"):
        factors.inverse_factors(-e, e.T)  # I − e·eᵀ has a zero eigenvalue


@pytest.mark.parametrize("rank", [1, 3, 8, 12])
def test_thin_svd_truncate_is_best_rank_r(rank):
    g = torch.Generator().manual_seed(0)
    U, V = torch.randn(30, 8, generator=g, dtype=torch.float64), torch.randn(8, 20, generator=g, dtype=torch.float64)
    X, sigma, Yt = torch.linalg.svd(U @ V)  # float64 full SVD of the dense product
    k = min(rank, 8)
    best = X[:, :k] @ torch.diag(sigma[:k]) @ Yt[:k]
    Ur, Vr = factors.thin_svd_truncate(U, V, rank)
    assert Ur.shape == (30, k) and Vr.shape == (k, 20)
    torch.testing.assert_close(Ur @ Vr, best, atol=1e-10, rtol=0)
    torch.testing.assert_close(Ur.T @ Ur, torch.diag(sigma[:k]), atol=1e-10, rtol=0)  # √σ on each side
    torch.testing.assert_close(Vr @ Vr.T, torch.diag(sigma[:k]), atol=1e-10, rtol=0)
    torch.testing.assert_close(factors.singular_values(U, V), sigma[:8], atol=1e-10, rtol=0)
    assert float(factors.frobenius_norm(U, V)) == pytest.approx(float((U @ V).norm()), rel=1e-12)


# ---------------------------------------------------------------- regularization
LR, DECAY = 0.01, 3.0


def pair(seed=0, zero_b=False):
    g = torch.Generator().manual_seed(seed)
    A, B = torch.randn(R, 12, generator=g), torch.randn(10, R, generator=g)
    return A, (torch.zeros_like(B) if zero_b else B)


def reference_decay(A, B, kind, lr=LR, lam=DECAY, s=S):
    """The closed-form step (docs/math.md, section 7) from dense float64 W."""
    A, B = A.double(), B.double()
    W = s * B @ A
    if kind == "nuclear":
        return A - lr * 2 * lam * s * A, B - lr * 2 * lam * s * B
    if kind == "l2":
        return A - lr * lam * s * B.T @ W, B - lr * lam * s * W @ A.T
    n = W.norm()
    step = min(lr * lam, float(n))
    return A - step * s * B.T @ (W / n), B - step * s * (W / n) @ A.T


@pytest.mark.parametrize("kind", ["nuclear", "l2", "l1"])
def test_regularize_pair_closed_form(kind):
    A, B = pair()
    A0, B0 = A.clone(), B.clone()
    stats = regularize_pair_(A, B, S, LR, DECAY, kind)
    A_ref, B_ref = reference_decay(A0, B0, kind)
    torch.testing.assert_close(A.double(), A_ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(B.double(), B_ref, atol=1e-6, rtol=1e-6)
    W0, W1 = S * B0.double() @ A0.double(), S * B.double() @ A.double()
    assert float(stats["norm"]) == pytest.approx(float(W1.norm()), rel=1e-9)
    assert float(stats["removed"]) == pytest.approx(float((W0 - W1).norm()), rel=1e-6)
    assert float(stats["removed"]) > 0


def test_regularize_l1_soft_threshold_and_zero():
    A, B = pair(zero_b=True)  # W = 0: l1 has no direction, nothing moves
    A0, B0 = A.clone(), B.clone()
    stats = regularize_pair_(A, B, S, LR, DECAY, "l1")
    assert torch.equal(A, A0) and torch.equal(B, B0)
    assert float(stats["norm"]) == 0 and float(stats["removed"]) == 0
    A, B = pair()
    with torch.no_grad():
        A *= 1e-3
    A0, B0 = A.clone(), B.clone()
    lam = 10 * float(S * (B0.double() @ A0.double()).norm()) / LR  # lr·λ > ‖W‖_F: the step is ‖W‖_F
    regularize_pair_(A, B, S, LR, lam, "l1")
    A_ref, B_ref = reference_decay(A0, B0, "l1", lam=lam)
    torch.testing.assert_close(A.double(), A_ref, atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(B.double(), B_ref, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("kind", ["nuclear", "l2", "l1"])
def test_regularize_max_norm(kind):
    A, B = pair()
    A0, B0 = A.clone(), B.clone()
    A_ref, B_ref = reference_decay(A0, B0, kind)
    decayed = float((S * B_ref @ A_ref).norm())
    max_norm = decayed / 2
    stats = regularize_pair_(A, B, S, LR, DECAY, kind, max_norm)
    factor = math.sqrt(max_norm / decayed)
    torch.testing.assert_close(A.double(), A_ref * factor, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(B.double(), B_ref * factor, atol=1e-6, rtol=1e-6)
    assert float((S * B.double() @ A.double()).norm()) == pytest.approx(max_norm, rel=1e-6)
    assert float(stats["norm"]) == pytest.approx(max_norm, rel=1e-6)
    A, B = pair()  # below the bound (decay off): untouched
    A0, B0 = A.clone(), B.clone()
    regularize_pair_(A, B, S, LR, 0.0, kind, max_norm=10 * decayed)
    assert torch.equal(A, A0) and torch.equal(B, B0)


@pytest.mark.parametrize("kind", ["nuclear", "l2", "l1"])
def test_regularize_spectral(kind):
    S0 = torch.tensor([0.5, -0.02, 0.0, -1.5], dtype=torch.float64)
    Sv = S0.float().clone()
    stats = regularize_spectral_(Sv, LR, DECAY, kind, max_norm=1.2)
    step = LR * DECAY
    ref = {
        "nuclear": torch.sign(S0) * torch.clamp(S0.abs() - step, min=0),
        "l2": S0 * (1 - step),
        "l1": S0 * max(0.0, 1 - step / float(S0.norm())),
    }[kind]
    if ref.norm() > 1.2:
        ref = ref * 1.2 / ref.norm()
    torch.testing.assert_close(Sv.double(), ref, atol=1e-6, rtol=1e-6)
    assert float(stats["norm"]) == pytest.approx(float(torch.expm1(ref).norm()), rel=1e-5)
    assert float(stats["removed"]) == pytest.approx(
        float((torch.expm1(S0.float().double()) - torch.expm1(ref)).norm()), rel=1e-5
    )


def test_regularize_model_walks_every_adapter():
    torch.manual_seed(0)
    model = torch.nn.ModuleDict(
        {
            "control": random_adapter("full"),
            "spectral": random_adapter("spectral"),
            "proj": LoraLinear(torch.nn.Linear(12, 10), R, ALPHA),
        }
    )
    with torch.no_grad():
        model["proj"].lora_B.weight.normal_()
    before = copy.deepcopy(model)
    cfg = SimpleNamespace(lora_weight_decay=DECAY, lora_weight_decay_type="l2", lora_max_norm=0.0)
    stats = regularize_model_(model, LR, cfg)
    assert set(stats) == {"control", "spectral", "proj"}
    A_ref, B_ref = reference_decay(before["control"].A, before["control"].B, "l2")
    torch.testing.assert_close(model["control"].A.double(), A_ref, atol=1e-6, rtol=1e-6)
    A_ref, B_ref = reference_decay(before["proj"].lora_A.weight, before["proj"].lora_B.weight, "l2")
    torch.testing.assert_close(model["proj"].lora_B.weight.double(), B_ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(model["spectral"].S, before["spectral"].S * (1 - LR * DECAY))
    assert torch.equal(model["proj"].base_layer.weight, before["proj"].base_layer.weight)
    off = SimpleNamespace(lora_weight_decay=0.0, lora_weight_decay_type="nuclear", lora_max_norm=0.0)
    after = copy.deepcopy(model)
    stats = regularize_model_([model], LR, off)  # a list of modules: names get "0." prefixes
    assert set(stats) == {"0.control", "0.spectral", "0.proj"}
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), after.parameters()))


# ---------------------------------------------------------------- LoRA vs PEFT
def tiny_llama(dtype=torch.float32):
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(config).to(dtype).eval()


def peft_and_ours(dtype, targets=("q_proj", "v_proj", "down_proj")):
    """The same tiny Llama with PEFT's LoRA and with ours, holding identical random adapter weights."""
    import peft

    base = tiny_llama(dtype)
    ours = copy.deepcopy(base)
    theirs = peft.get_peft_model(
        base, peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=list(targets))
    )
    names = inject_lora(ours, list(targets), R, ALPHA, 0.0, torch.float32)
    assert len(names) == len(targets) * 2
    mine = dict(ours.named_parameters())
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                assert p.dtype == torch.float32
                p.normal_(0, 0.2)
                mine[name.removeprefix("base_model.model.").replace(".default", "")].copy_(p)
    return theirs, ours, names


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_matches_peft(dtype):
    theirs, ours, _ = peft_and_ours(dtype)
    x = torch.randn(2, 5, 64, dtype=dtype)
    module_theirs = theirs.base_model.model.model.layers[1].self_attn.q_proj
    module_ours = ours.model.layers[1].self_attn.q_proj
    assert isinstance(module_ours, LoraLinear)
    assert torch.equal(module_ours(x), module_theirs(x))
    ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        logits_theirs, logits_ours = theirs(ids).logits, ours(ids).logits
    assert logits_ours.dtype == dtype
    torch.testing.assert_close(logits_ours, logits_theirs, atol=1e-5, rtol=0)
    assert (logits_ours - tiny_llama(dtype)(ids).logits).abs().max() > 1e-2  # the adapter does something
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad and "lora_" not in n}
    assert all(not p.requires_grad for n, p in ours.named_parameters() if "base_layer" in n)
    assert "lm_head.weight" in trainable  # inject_lora freezes only what it wraps


def test_inject_lora_default_targets():
    model = tiny_llama()
    names = inject_lora(model, None, R, ALPHA)
    leaves = {n.rsplit(".", 1)[-1] for n in names}
    assert leaves == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert len(names) == 14 and "lm_head" not in names
    assert inject_lora(model, None, R, ALPHA) == []  # already wrapped: nothing new
    layer = tiny_llama().model.layers[0]
    assert inject_lora(layer, ["o_proj"], R, ALPHA) == ["self_attn.o_proj"]


def test_lora_on_4bit_base():
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    base = bnb.nn.Linear4bit(64, 32, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    base.weight = bnb.nn.Params4bit(torch.randn(32, 64) / 8, requires_grad=False, quant_type="nf4")
    base = base.to("cpu")  # quantizes
    module = LoraLinear(base, R, ALPHA)
    with torch.no_grad():
        module.lora_B.weight.normal_()
    x = torch.randn(3, 64, dtype=torch.bfloat16, requires_grad=True)
    y = module(x)
    A, B = module.lora_A.weight.detach().double(), module.lora_B.weight.detach().double()
    ref = base(x).double() + S * x.detach().double() @ A.T @ B.T
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), ref, atol=2e-2, rtol=1e-2)
    y.float().sum().backward()
    assert module.lora_A.weight.grad.abs().max() > 0 and x.grad is not None


def test_lora_norms():
    module = LoraLinear(torch.nn.Linear(12, 10), R, ALPHA)
    with torch.no_grad():
        module.lora_B.weight.normal_()
    W = S * module.lora_B.weight.detach().double() @ module.lora_A.weight.detach().double()
    norms = module.norms()
    assert norms["frobenius"] == pytest.approx(float(W.norm()), rel=1e-9)
    assert norms["spectral"] == pytest.approx(float(torch.linalg.matrix_norm(W, 2)), rel=1e-9)


def test_lora_folder_loads_in_peft(tmp_path):
    import peft

    theirs, ours, names = peft_and_ours(torch.float32)
    tensors = {f"base_model.model.{n}": p for n, p in ours.named_parameters() if "lora_" in n}
    cfg = Config(
        model_dir=Path("/base"),
        output_dir=tmp_path,
        lr=1e-4,
        sequence_len=16,
        datasets=(),
        lora_rank=R,
        lora_alpha=ALPHA,
    )
    save_adapter(tmp_path / "epoch1", tensors, adapter_config_for(cfg, [0, 1], "/base", names))
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "epoch1").eval()
    ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, ours(ids).logits, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- io
def control_cfg(tmp_path, adapter_type="full", **kw):
    return Config(
        model_dir=Path("/base"),
        output_dir=tmp_path,
        lr=1e-4,
        sequence_len=16,
        datasets=(),
        use_control_adapters=True,
        lora_rank=R,
        control_adapter_type=adapter_type,
        **kw,
    )


def test_adapter_config_for(tmp_path):
    config = adapter_config_for(control_cfg(tmp_path, "spectral", control_adapter_target="writers"), [3, 1], "/m")
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["r"] == R and config["lora_alpha"] == pytest.approx(math.sqrt(R)) and config["lora_dropout"] == 0
    assert config["target_modules"] == [] and config["layers_to_transform"] == [1, 3]
    assert config["base_model_name_or_path"] == "/m"
    assert config["control_adapter_type"] == "spectral" and config["control_adapter_target"] == "writers"
    lora = Config(
        model_dir=Path("/base"),
        output_dir=tmp_path,
        lr=1e-4,
        sequence_len=16,
        datasets=(),
        lora_rank=8,
        lora_alpha=16.0,
        target_modules=("v_proj", "q_proj"),
    )
    config = adapter_config_for(lora, [0], "/m")
    assert config["target_modules"] == ["q_proj", "v_proj"] and config["lora_alpha"] == 16.0
    assert "control_adapter_type" not in config


@pytest.mark.parametrize("adapter_type", ["full", "spectral"])
def test_save_load_round_trip(tmp_path, adapter_type):
    states = {i: random_adapter(adapter_type, seed=i).state() for i in (0, 2)}
    tensors = control_tensors(states)
    expected_keys = {"control_A.weight", "control_B.weight"} if adapter_type == "full" else {"control_Q", "control_S"}
    assert {k.split(".", 5)[-1] for k in tensors} == expected_keys
    assert all(k.startswith("base_model.model.model.layers.") for k in tensors)
    config = adapter_config_for(control_cfg(tmp_path, adapter_type), [0, 2], "/base")
    folder = tmp_path / "epoch1"
    save_adapter(folder, tensors, config)
    got, got_config = load_adapter(folder)
    assert got_config == config
    assert got.keys() == tensors.keys() and all(torch.equal(got[k], tensors[k]) for k in tensors)
    by_layer = control_state_by_layer(got)
    assert list(by_layer) == [0, 2] and all(
        torch.equal(by_layer[i][n], states[i][n]) for i in states for n in states[i]
    )
    # overwrite in place: new contents, no temp files left behind
    states[0] = random_adapter(adapter_type, seed=5).state()
    save_adapter(folder, control_tensors(states), config)
    got, _ = load_adapter(folder)
    assert torch.equal(control_state_by_layer(got)[0][next(iter(states[0]))], next(iter(states[0].values())))
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch1"]


def test_load_qlora_pipe_lite_folder(tmp_path):
    """Only control_A/control_B keys and a plain PEFT config: means full / block."""
    torch.manual_seed(0)
    save_file(
        {
            f"base_model.model.model.layers.{i}.control_{n}.weight": torch.randn(*shape)
            for i in range(3)
            for n, shape in (("A", (R, H)), ("B", (H, R)))
        },
        tmp_path / "adapter_model.safetensors",
    )
    (tmp_path / "adapter_config.json").write_text(
        json.dumps(
            {"peft_type": "LORA", "r": R, "lora_alpha": 2.0, "target_modules": [], "layers_to_transform": [0, 1, 2]}
        )
    )
    tensors, config = load_adapter(tmp_path)
    assert config["control_adapter_type"] == "full" and config["control_adapter_target"] == "block"
    assert list(control_state_by_layer(tensors)) == [0, 1, 2]


def write_control_folder(folder, config=None, **shapes):
    folder.mkdir(parents=True, exist_ok=True)
    shapes = {"A": (R, H), "B": (H, R), **shapes}
    save_file(
        {f"base_model.model.model.layers.0.control_{n}.weight": torch.zeros(s) for n, s in shapes.items()},
        folder / "adapter_model.safetensors",
    )
    (folder / "adapter_config.json").write_text(json.dumps(config or {"peft_type": "LORA", "r": R}))
    return folder


def test_load_errors(tmp_path):
    with pytest.raises(CapError, match="adapter folder not found"):
        load_adapter(tmp_path / "nope")
    folder = write_control_folder(tmp_path / "a")
    (folder / "adapter_config.json").unlink()
    with pytest.raises(CapError, match=r"adapter_config\.json: file not found"):
        load_adapter(folder)
    folder = write_control_folder(tmp_path / "b")
    (folder / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    with pytest.raises(CapError, match=r"adapter_model\.safetensors: not a readable safetensors"):
        load_adapter(folder)
    folder = write_control_folder(tmp_path / "c")
    data = (folder / "adapter_model.safetensors").read_bytes()
    (folder / "adapter_model.safetensors").write_bytes(data[: len(data) - 40])  # truncated
    with pytest.raises(CapError, match=r"adapter_model\.safetensors"):
        load_adapter(folder)
    folder = write_control_folder(tmp_path / "d", B=(H, R + 1))
    with pytest.raises(
        CapError, match=r"adapter_model\.safetensors: .*layers\.0\.control_B\.weight has shape \[16, 5\]"
    ):
        load_adapter(folder)
    folder = write_control_folder(tmp_path / "e", A=(R + 2, H), B=(H, R + 2))  # disagrees with r in the config
    with pytest.raises(CapError, match=r"control_A\.weight has shape \[6, 16\]; expected \[4, 16\]"):
        load_adapter(folder)
    folder = write_control_folder(tmp_path / "f", {"peft_type": "LORA", "r": R, "control_adapter_type": "spectral"})
    with pytest.raises(CapError, match=r"missing key .*layers\.0\.control_Q"):
        load_adapter(folder)
    folder = write_control_folder(tmp_path / "g")
    (folder / "adapter_config.json").write_text("{broken")
    with pytest.raises(CapError, match=r"adapter_config\.json: not valid JSON"):
        load_adapter(folder)
