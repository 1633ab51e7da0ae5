"""An independent trainer for the training-equivalence tests (tests/test_train_matrix.py).

It trains what a cap-train config asks for with transformers' model, PEFT's LoRA (on the
nf4-dequantized base for QLoRA), control adapters as forward hooks on dense H×H matrices, and
torch-optimi's Adam, following what cap-train documents rather than cap's code:

- data (README, cap_train/order.py's docstring): epoch e reads numpy PCG64([seed, e])'s permutation
  of the train rows, G = micro_batch_size · gradient_accumulation_steps rows per step;
- loss: position t predicts token t+1 and carries that token's class; class 0 carries no loss;
  a micro batch's loss is the token mean of its cross entropies, the step's the mean of those;
  a bf16 LM head multiplies through an fp32 copy of its weight on a CPU without native bf16, as
  cap documents for such CPUs (README, development), else in bf16 (`head_fp32`);
- ‖g‖ over every trainable gradient (float64), g ← g·c/(‖g‖ + 1e-6) when ‖g‖ > c = max_grad_norm;
- Adam (β₁, β₂, ε) at lr_t = lr·√((1 − β₂ᵗ)/(1 + β₂ᵗ)) ('rms_ratio') or lr ('none');
- then the decoupled regularization step at lr_t, on W = s·B·A formed densely (or on S, spectral):
  nuclear A,B ← (1 − 2·lr·λ·s)·A,B; l2 A −= lr·λ·s·BᵀW, B −= lr·λ·s·WAᵀ; l1 the same with W/‖W‖_F
  and lr·λ → min(lr·λ, ‖W‖_F); then max-norm A,B ·= √(max/‖W‖_F) when ‖W‖_F > max.

Only the initial adapter comes from cap (its seeded initialization, read off cap's modules): the
equivalence is about what training does to it. `Bugs` makes the reference wrong on purpose, for the
tests that show the comparisons catch such a difference.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import tomllib
import torch
import transformers
from safetensors.torch import load_file, save_file

# The modules whose output is added into the residual stream, in any family the matrix trains: attention's
# output projection, a dense MLP's down projection, an MoE layer's routed experts (their weighted sum)
# and its shared experts' down projection. A layer has those of them it has.
WRITERS = ("self_attn.o_proj", "mlp.down_proj", "mlp.experts", "mlp.shared_experts.down_proj")
PEFT = "base_model.model.model.layers.{}."  # prefix of a layer's adapter tensors in epoch<N>/
CONTROL_NAMES = {"A": "control_A.weight", "B": "control_B.weight", "Q": "control_Q", "S": "control_S"}


@dataclass(frozen=True)
class Bugs:
    """Deliberate errors (all off by default): adapters trained in bf16 instead of float32; nf4 without
    double quantization of the block scales; the adapter scale α/r multiplied by `scale`."""

    bf16_adapters: bool = False
    single_quant: bool = False
    scale: float = 1.0


@dataclass
class Run:
    """What the reference reads of a cap-train config (TOML), with cap's documented defaults."""

    mode: str  # control | lora | qlora | full
    model_dir: Path
    keys: dict = field(default_factory=dict)

    @classmethod
    def from_toml(cls, path: Path) -> Run:
        keys = tomllib.loads(path.read_text())
        mode = (
            "full"
            if keys.get("full_fine_tune")
            else "control"
            if keys.get("use_control_adapters")
            else "qlora"
            if keys.get("load_in_4bit")
            else "lora"
        )
        return cls(mode, Path(keys["model_dir"]), keys)

    def get(self, name, default=None):
        return self.keys.get(name, default)

    @property
    def four_bit(self) -> bool:
        return bool(self.get("load_in_4bit"))

    @property
    def scale(self) -> float:
        r = self.get("lora_rank")
        return self.get("lora_alpha", math.sqrt(r)) / r

    @property
    def layers(self) -> list[int] | None:
        spec = self.get("layers_to_transform")
        if spec is None:
            return None
        first, last = map(int, str(spec).split(":"))
        return list(range(first, last + 1))

    def lr_at(self, t: int) -> float:
        lr = self.get("lr")
        if self.get("warmup", "rms_ratio") == "rms_ratio":
            b = self.get("beta2", 0.99) ** t
            return lr * math.sqrt((1 - b) / (1 + b))
        return lr


# ---------------------------------------------------------------- data
def split_rows(prepared: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids [n,L], control_class [n,L]) of a prepared split, read with pyarrow alone."""
    folders = [p for p in prepared.iterdir() if (p / "manifest.json").is_file()]
    assert len(folders) == 1
    manifest = json.loads((folders[0] / "manifest.json").read_text())
    L = manifest["sequence_len"]
    ids, classes = [], []
    for shard in manifest["splits"][split]["shards"]:
        table = pa.ipc.open_file(pa.memory_map(str(folders[0] / shard["file"]))).read_all()
        ids.append(torch.tensor(table.column("input_ids").combine_chunks().flatten().to_numpy()).view(-1, L))
        classes.append(torch.tensor(table.column("control_class").combine_chunks().flatten().to_numpy()).view(-1, L))
    return torch.cat(ids).long(), torch.cat(classes).long()


def step_rows(n_rows: int, seed: int, global_batch: int, step: int) -> np.ndarray:
    """Rows of optimizer step `step` (0-based, within the first epoch)."""
    perm = np.random.Generator(np.random.PCG64([seed, 0])).permutation(n_rows)
    return perm[step * global_batch : (step + 1) * global_batch]


def shifted(ids: torch.Tensor, classes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels, label classes) [b,L]: position t predicts ids[t+1] with classes[t+1]; the last and
    class-0 positions get label −100."""
    label_class = torch.zeros_like(classes)
    label_class[:, :-1] = classes[:, 1:]
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    return labels.masked_fill(label_class == 0, -100), label_class


# ---------------------------------------------------------------- the base model
def dequantized_base(model_dir: Path, folder: Path, double_quant: bool = True) -> Path:
    """The base with every decoder-layer linear weight replaced by its nf4 (double-quant, block 64)
    round trip, as bitsandbytes quantizes it for QLoRA; bf16, like the trained model computes."""
    import bitsandbytes.functional as F

    if folder.exists():
        return folder
    tensors = load_file(str(model_dir / "model.safetensors"))
    for name, w in tensors.items():
        if ".layers." in name and name.endswith("proj.weight"):
            q, state = F.quantize_4bit(
                w.to(torch.bfloat16), blocksize=64, compress_statistics=double_quant, quant_type="nf4"
            )
            tensors[name] = F.dequantize_4bit(q, state).to(torch.bfloat16)
        else:
            tensors[name] = w.to(torch.bfloat16)
    shutil.copytree(model_dir, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def base_model(run: Run, tmp: Path, head_fp32: bool = False, bugs: Bugs = Bugs()):
    """transformers' model of the run's base: float32, or bf16 on the nf4 round trip for 4-bit runs;
    `head_fp32`: a bf16 LM head's logits h·Wᵀ computed as float32(h)·float32(W)ᵀ."""
    if not run.four_bit:
        return transformers.AutoModelForCausalLM.from_pretrained(run.model_dir, dtype=torch.float32)
    double = not bugs.single_quant
    folder = dequantized_base(run.model_dir, tmp / f"dequantized-{'double' if double else 'single'}", double)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    if head_fp32:
        model.lm_head.register_forward_hook(lambda m, args, out: args[0].float() @ m.weight.float().T)
    return model


def cap_initial_adapter(config: Path) -> dict[str, torch.Tensor]:
    """cap's seeded initial adapter, by the names epoch<N>/ uses: built with cap's own stage builder
    (the one thing the reference takes from cap)."""
    from cap_common.adapters.lora import LoraLinear
    from cap_common.config import load_config
    from cap_common.models import ModelSpec
    from cap_common.models.pipeline import StageBuilder

    builder = StageBuilder(ModelSpec.from_config(load_config(config)))
    out = {}
    for i in range(builder.num_layers):
        pipe = builder.decoder_layer(i)
        if pipe.adapter is not None:
            for name, p in pipe.adapter.named_parameters():
                out[PEFT.format(i) + CONTROL_NAMES[name]] = p.detach().clone()
        for name, module in pipe.layer.named_modules():
            if isinstance(module, LoraLinear):
                out[PEFT.format(i) + f"{name}.lora_A.weight"] = module.lora_A.weight.detach().clone()
                out[PEFT.format(i) + f"{name}.lora_B.weight"] = module.lora_B.weight.detach().clone()
    return out


# ---------------------------------------------------------------- the adapters
def control_weights(kind: str, params: dict[str, torch.Tensor], scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense (W'₊, W'₋) [H,H] of one layer, differentiable: full W = s·B·A, symmetrise (W + Wᵀ)/2,
    antisymmetrise (W − Wᵀ)/2, each with W'₋ = −W'₊; spectral Q̂·diag(e^{±S} − 1)·Q̂ᵀ, Q̂ = qr(Q).Q."""
    if kind == "spectral":
        Q = torch.linalg.qr(params["Q"]).Q
        return (Q * torch.expm1(params["S"])) @ Q.T, (Q * torch.expm1(-params["S"])) @ Q.T
    W = scale * params["B"] @ params["A"]
    W = {"full": W, "symmetrise": (W + W.T) / 2, "antisymmetrise": (W - W.T) / 2}[kind]
    return W, -W


def add_control_hooks(model, run: Run, params: dict[int, dict[str, torch.Tensor]], label_class: list):
    """Forward hooks applying each layer's adapter with each position's label class c:
    x ↦ x + [c = +1]·x·W'₊ᵀ + [c = −1]·x·W'₋ᵀ, on the block delta y − h or on each writer's output."""
    kind = run.get("control_adapter_type", "full")
    hooks = []
    for i, block in enumerate(model.model.layers):
        if i not in params:
            continue

        def transform(x, p=params[i]):  # in the adapter's dtype, added in the model's
            w_pos, w_neg = control_weights(kind, p, run.scale)
            c = label_class[0].reshape(x.shape[:-1]).unsqueeze(-1)
            xa = x.to(w_pos.dtype)
            return x + ((c > 0) * (xa @ w_pos.T) + (c < 0) * (xa @ w_neg.T)).to(x.dtype)

        if run.get("control_adapter_target", "block") == "writers":
            names = {name for name, _ in block.named_modules()}
            for path in (p for p in WRITERS if p in names):
                hooks.append(block.get_submodule(path).register_forward_hook(lambda m, a, out, f=transform: f(out)))
        else:

            def block_hook(m, args, kwargs, out, f=transform):
                h = args[0] if args else kwargs["hidden_states"]
                y = out[0] if isinstance(out, tuple) else out
                y = h + f(y - h)
                return (y, *out[1:]) if isinstance(out, tuple) else y

            hooks.append(block.register_forward_hook(block_hook, with_kwargs=True))
    return hooks


def build(run: Run, initial: dict[str, torch.Tensor], tmp: Path, head_fp32: bool = False, bugs: Bugs = Bugs()):
    """(model, {name in epoch<N>/: trainable tensor}, [current label classes]) for the run's mode."""
    model = base_model(run, tmp, head_fp32, bugs)
    adapter_dtype = torch.bfloat16 if bugs.bf16_adapters else torch.float32
    label_class: list = [None]
    if run.mode == "full":
        return model, dict(model.named_parameters()), label_class
    model.requires_grad_(False)
    n_layers = model.config.num_hidden_layers
    layers = run.layers or list(range(n_layers))
    trainable = {}
    if run.mode == "control":
        params = {}
        for i in layers:
            layer = {k.rsplit("_", 1)[1].split(".")[0]: v for k, v in initial.items() if k.startswith(PEFT.format(i))}
            params[i] = {k: torch.nn.Parameter(v.to(adapter_dtype, copy=True)) for k, v in layer.items()}
            for k, p in params[i].items():
                trainable[PEFT.format(i) + CONTROL_NAMES[k]] = p
        add_control_hooks(model, run, params, label_class)
        return model, trainable, label_class
    from peft import LoraConfig, get_peft_model

    # every linear of a decoder layer by default (PEFT's 'all-linear' cannot be limited to layers)
    linears = {n.rpartition(".")[2] for n, m in model.model.layers[0].named_modules() if isinstance(m, torch.nn.Linear)}
    targets = run.get("target_modules") or sorted(linears)
    lora = LoraConfig(
        r=run.get("lora_rank"),
        lora_alpha=run.scale * run.get("lora_rank"),
        lora_dropout=0.0,
        target_modules=targets,
        layers_to_transform=layers,
    )
    model = get_peft_model(model, lora)
    for name, p in model.named_parameters():
        if "lora_" in name:
            key = name.replace(".default", "")
            with torch.no_grad():
                p.data = initial[key].to(adapter_dtype, copy=True)
            trainable[key] = p
    assert set(trainable) == set(initial), sorted(set(trainable) ^ set(initial))[:4]
    return model, trainable, label_class


# ---------------------------------------------------------------- regularization (dense, documented)
@torch.no_grad()
def regularize(run: Run, trainable: dict[str, torch.Tensor], lr: float) -> None:
    decay, kind, max_norm = (
        run.get("lora_weight_decay", 0.0),
        run.get("lora_weight_decay_type", "nuclear"),
        run.get("lora_max_norm", 0.0),
    )
    if run.mode == "full" or (decay == 0 and max_norm == 0):
        return
    step = lr * decay
    if run.get("control_adapter_type") == "spectral" and run.mode == "control":
        for name, S in trainable.items():
            if not name.endswith("control_S"):
                continue
            S64 = S.double()
            if kind == "nuclear":
                S64 = S64.sign() * (S64.abs() - step).clamp_min(0)
            elif kind == "l2":
                S64 = S64 * (1 - step)
            elif kind == "l1" and S64.norm() > 1e-12:
                S64 = S64 * max(0.0, 1 - step / float(S64.norm()))
            if max_norm > 0 and S64.norm() > max_norm:
                S64 = S64 * max_norm / S64.norm()
            S.copy_(S64)
        return
    s = run.scale
    pairs = [(n, n.replace("lora_A", "lora_B").replace("control_A", "control_B")) for n in trainable]
    for a_name, b_name in pairs:
        if a_name == b_name:  # a B (or Q/S) name
            continue
        A, B = trainable[a_name], trainable[b_name]
        A0, B0 = A.double(), B.double()
        W = s * B0 @ A0
        A1, B1 = A0, B0
        if step > 0 and kind == "nuclear":
            A1, B1 = A0 * (1 - 2 * step * s), B0 * (1 - 2 * step * s)
        elif step > 0:
            norm = float(W.norm())
            coef, D = step, W
            if kind == "l1":
                coef, D = min(step, norm), W / norm
            A1, B1 = A0 - coef * s * B0.T @ D, B0 - coef * s * D @ A0.T
        if max_norm > 0:
            norm = float((s * B1 @ A1).norm())
            if norm > max_norm:
                A1, B1 = A1 * math.sqrt(max_norm / norm), B1 * math.sqrt(max_norm / norm)
        A.copy_(A1)
        B.copy_(B1)


# ---------------------------------------------------------------- the loop
def train(
    run: Run,
    prepared: Path,
    initial: dict[str, torch.Tensor],
    steps: int,
    tmp: Path,
    head_fp32: bool = False,
    bugs: Bugs = Bugs(),
):
    """Train `steps` optimizer steps; returns ({name: tensor after}, [loss per step], [‖g‖ per step])."""
    from optimi import Adam

    if bugs.scale != 1.0:
        run = Run(run.mode, run.model_dir, {**run.keys, "lora_alpha": run.scale * run.get("lora_rank") * bugs.scale})
    model, trainable, label_class = build(run, initial, tmp, head_fp32, bugs)
    ids, classes = split_rows(prepared, "train")
    micro, accumulation = run.get("micro_batch_size", 1), run.get("gradient_accumulation_steps", 1)
    params = list(trainable.values())
    optimizer = Adam(
        params, lr=run.get("lr"), betas=(run.get("beta1", 0.9), run.get("beta2", 0.99)), eps=run.get("eps", 1e-6)
    )
    losses, norms = [], []
    for t in range(1, steps + 1):
        rows = step_rows(len(ids), run.get("seed", 42), micro * accumulation, t - 1)
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for m in range(accumulation):
            batch = torch.as_tensor(rows[m * micro : (m + 1) * micro])
            labels, label_class[0] = shifted(ids[batch], classes[batch])
            logits = model(input_ids=ids[batch]).logits.float()
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
            (loss / accumulation).backward()
            step_loss += loss.item() / accumulation
        grads = [p.grad for p in params if p.grad is not None]
        norm = float(torch.stack([g.double().square().sum() for g in grads]).sum().sqrt())
        clip = run.get("max_grad_norm", 1.0)
        if clip > 0 and norm > clip:
            for g in grads:
                g.mul_(clip / (norm + 1e-6))
        lr = run.lr_at(t)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        regularize(run, trainable, lr)
        losses.append(step_loss)
        norms.append(norm)
    return {k: orthonormal_q(k, v.detach()) for k, v in trainable.items()}, losses, norms


def orthonormal_q(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """What epoch<N>/ holds of a trained tensor: a spectral Q as its orthonormal basis qr(Q).Q."""
    return torch.linalg.qr(tensor).Q if name.endswith("control_Q") else tensor.clone()
