"""`cap-train CONFIG --plan`: what each pipeline stage will hold, from config.json alone (the layers
are built on the meta device: shapes, no weights), before anything is launched.

Per stage (positions split as DeepSpeed splits them, cap_common.models.pipeline.stage_parts), bytes of:
    base          frozen weights in model_dtype; 4-bit: 0.5 byte per linear weight + its quantization
                  state (1 byte absmax per 64 weights, 4 bytes per 256 absmax blocks)
    trainable     adapter (or full fine-tune) parameters in their dtype, and as many bytes of gradient
    optimizer     Adam's m and v in the parameter's dtype (+ a Kahan buffer for 16-bit parameters)
    activations   per micro batch in flight (1F1B: min(stages − s, gradient_accumulation_steps) on
                  stage s), per decoder layer that backward reaches (from the first trained layer on),
                  by the layer's activation_checkpointing mode (common/models/recompute.py):
                    none: saved by autograd ≈ (8·H + 2·H_kv + 4·I_active) · B·T elements
                    'selective': the matmul and attention outputs ≈ (5·H + 2·H_kv + 2·I_active) · B·T
                    full: the layer input H · B·T elements ('offload': on the host), plus one
                    layer's saved set during its recomputation
                  plus DeepSpeed's pipe send/receive buffers (2 · B·T·H per micro batch in flight),
                  and with document_attention the additive masks [B,1,T,T] in model_dtype that a
                  micro batch's layers share (one per distinct sliding window on the stage, per
                  micro batch in flight) and the boolean temporaries of building one (2 · B·T²)
    loss          the fused LM head + cross entropy (last stage): a [C, V] fp32 chunk and its
                  temporaries (C·V ≈ 256 MiB, fewer rows if B·T is smaller), the fp32 hidden
                  gradient, and on CPU an fp32 copy of a 16-bit head (not of bf16 with native bf16)
    runtime       the process itself: on CPU, a fresh Python's peak with torch, DeepSpeed and
                  transformers imported (measured in a subprocess) plus what a worker adds (and
                  inductor's share with compile_layers); on GPU the CUDA context and allocator slack
(H hidden size, H_kv = key/value heads × head dim, I_active intermediate size × experts per token,
B micro batch, T sequence_len, V vocabulary; element size of model_dtype.)
Also: the pipeline bubble (S − 1)/(M + S − 1) for M = gradient_accumulation_steps micro batches over
S stages, and the tokens per optimizer step. cap-train's own metrics report the measured peak
(`memory/peak_rss_gib` on CPU, `memory/peak_cuda_gib` on GPU); tests hold the plan to them.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn

from cap_common.config import Config
from cap_common.dtypes import torch_dtype
from cap_common.models.recompute import layer_mode
from cap_kernels.fused_linear_ce import upcasts_head

GIB = 2**30
# What a CPU worker holds beyond Python with torch, DeepSpeed and transformers imported (its engine,
# gloo, the data, the tokenizer): measured 0.23 GiB on two Python builds whose imports differ by 58 MiB.
WORKER_EXTRA = 0.23 * GIB
BNB_RUNTIME = 0.06 * GIB  # bitsandbytes' import on top of it
# compile_layers on CPU: inductor's imports and generated kernels, first compilation (cold cache):
# measured +0.10 GiB peak RSS on the dev VM (tiny models); in a fresh CI clone the compiled runs peaked
# 0.15 to 0.19 GiB above the plan without it
COMPILE_RUNTIME = 0.15 * GIB
GPU_RUNTIME = 1.0 * GIB  # CUDA context (~0.5 GiB) and allocator slack
LOSS_CHUNK_BYTES = 256 * 2**20  # kernels/cross_entropy.CHUNK_BYTES
# On CPU the process's resident memory grows by more than the bytes autograd saves: blocks freed in
# backward stay in glibc's heap, fragmented. Measured with SmolLM2 (benchmarks: 1.17-1.73, 1 and 2
# stages, seq 512, micro batch 1-4); cap's CUDA allocator statistics count the saved bytes themselves.
CPU_ACTIVATION_FACTOR = 1.45
# On CPU, recomputing checkpointed layers one by one leaves part of what they allocate resident
# (fragmented heap): measured 0.37 × the stage's no-checkpointing saved set, on 1 and 2 stages and
# two Python builds (torch's non-reentrant checkpoint, SmolLM2, seq 512, micro batch 2).
CPU_RECOMPUTE_RESIDUE = 0.37
CPU_LOSS_COPIES = 1.5  # [C, V] fp32 buffers the torch path of the fused loss holds at its peak (measured)


@dataclass
class StagePlan:
    stage: int
    positions: tuple[int, int]  # first, last pipeline position (0 = embedding, N + 1 = LM head)
    base: float
    trainable: float
    gradients: float
    optimizer: float
    activations_checkpointed: float
    activations_full: float
    activations: float  # under the config's own activation_checkpointing mode (each includes `masks`)
    loss: float
    runtime: float
    file_pages: float = 0.0  # CPU: the mapped safetensors pages this stage read (the files stay open)
    masks: float = 0.0  # document_attention: the document masks of the micro batches in flight

    def peak(self, checkpointing: bool | None = None) -> float:
        """Peak bytes with every layer checkpointed (True), none (False), or the config's mode (None)."""
        acts = {None: self.activations, True: self.activations_checkpointed, False: self.activations_full}[
            checkpointing
        ]
        fixed = self.base + self.trainable + self.gradients + self.optimizer + self.loss + self.runtime
        return fixed + acts + self.file_pages


@dataclass
class Plan:
    model: str
    device: str
    processes: int
    pipeline_stages: int
    data_parallel: int
    load_in_4bit: bool
    activation_checkpointing: bool | str | int
    tokens_per_step: int
    bubble: float
    document_attention: bool = False
    stages: list[StagePlan] = field(default_factory=list)

    def peaks(self, checkpointing: bool | None = None) -> list[float]:
        return [s.peak(checkpointing) for s in self.stages]

    def to_dict(self) -> dict:
        out = asdict(self)
        out["peak_bytes"] = self.peaks()
        out["peak_bytes_checkpointed"] = self.peaks(True)
        out["peak_bytes_no_checkpointing"] = self.peaks(False)
        return out


@functools.cache
def cpu_runtime() -> float:
    """A cap-train worker's own footprint on CPU: a fresh interpreter's peak after importing torch,
    DeepSpeed and transformers (so this Python build and these library versions count), plus
    WORKER_EXTRA. 0.46 GiB when it cannot be measured."""
    # resident pages now, not ru_maxrss: a child's high-water mark starts at its parent's
    probe = (
        "import os, torch, deepspeed, transformers; "
        "print(int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE'))"
    )
    try:
        out = subprocess.run(
            [sys.executable, "-c", probe],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "DS_ACCELERATOR": "cpu"},
        )
        return int(out.stdout.split()[-1]) + WORKER_EXTRA
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return 0.46 * GIB


def _numel(params) -> int:
    return sum(p.numel() for p in params)


def _kv_dim(config) -> int:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return (getattr(config, "num_key_value_heads", None) or heads) * head_dim


def _active_intermediate(config) -> int:
    inter = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
    return inter * (getattr(config, "num_experts_per_tok", None) or 1)


def _layer_bytes(family, config, cfg: Config, index: int, dtype: torch.dtype) -> tuple[float, float, float]:
    """(frozen bytes, trainable bytes, optimizer bytes) of decoder layer `index` as cap-train builds it."""
    from cap_common.adapters.control import ControlAdapter
    from cap_common.adapters.lora import inject_lora
    from cap_common.models.loading import meta_decoder_layer
    from cap_common.models.pipeline import base_weight_trains, linear_names

    layer = meta_decoder_layer(family, config, index)
    size = torch.tensor([], dtype=dtype).element_size()
    transformed = cfg.layers_to_transform is None or index in cfg.layers_to_transform
    adapter_dtype = torch_dtype(cfg.lora_weight_dtype)
    trainable: list[nn.Parameter] = []
    if cfg.full_fine_tune:
        trainable = [
            p
            for name, p in layer.named_parameters()
            if base_weight_trains(cfg.target_modules, cfg.layers_to_transform, f"model.layers.{index}.{name}", index)
        ]
    chosen = {id(p) for p in trainable}
    frozen = [p for p in layer.parameters() if id(p) not in chosen]
    if cfg.load_in_4bit:
        weights = _numel(p for p in frozen if p.dim() >= 2)
        base = weights * (0.5 + 1 / 64 + 4 / (64 * 256)) + _numel(p for p in frozen if p.dim() < 2) * size
    else:
        base = _numel(frozen) * size
    if transformed and not cfg.full_fine_tune:
        with torch.device("meta"):
            if cfg.use_control_adapters:
                module = ControlAdapter(
                    config.hidden_size, cfg.lora_rank, 1.0, cfg.control_adapter_type, 0.0, adapter_dtype
                )
                trainable = list(module.parameters())
            else:
                before = {id(p) for p in layer.parameters()}
                inject_lora(
                    layer, tuple(cfg.target_modules or linear_names(layer)), cfg.lora_rank, 1.0, 0.0, adapter_dtype
                )
                trainable = [p for p in layer.parameters() if id(p) not in before]
    train_bytes = sum(p.numel() * p.element_size() for p in trainable)
    kahan = sum(p.numel() * p.element_size() for p in trainable if p.dtype in (torch.bfloat16, torch.float16))
    return base, train_bytes, 2 * train_bytes + kahan


_SHAPES: dict = {}  # (config, layer index) → the layer's (tensor name, shape, dtype)s
_BYTES: dict = {}  # (layer shapes, what acts on them) → _layer_bytes


def _all_layer_bytes(family, config, cfg: Config, dtype: torch.dtype) -> list[tuple[float, float, float]]:
    """_layer_bytes of every decoder layer, computed once per process for each distinct layer (its tensor
    shapes and the settings that act on it): the search for the smallest fit makes a plan per trial,
    and a 70B model has 80 alike layers."""
    from cap_common.models.loading import meta_decoder_layer

    model = (family.model_type, config.to_json_string())
    settings = (
        cfg.full_fine_tune,
        cfg.target_modules,
        cfg.load_in_4bit,
        cfg.use_control_adapters,
        cfg.lora_rank,
        cfg.control_adapter_type,
        cfg.lora_weight_dtype,
        dtype,
    )
    out = []
    for i in range(config.num_hidden_layers):
        if (model, i) not in _SHAPES:
            layer = meta_decoder_layer(family, config, i)
            _SHAPES[model, i] = tuple((n, tuple(p.shape), p.dtype) for n, p in layer.named_parameters())
        transformed = cfg.layers_to_transform is None or i in cfg.layers_to_transform
        # a full fine-tune's target_modules match names with the layer's index in them
        key = (model, _SHAPES[model, i], settings, transformed, i if cfg.full_fine_tune else None)
        if key not in _BYTES:
            _BYTES[key] = _layer_bytes(family, config, cfg, i, dtype)
        out.append(_BYTES[key])
    return out


def make_plan(cfg: Config, processes: int, device: str = "cpu") -> Plan:
    """The plan of `cfg` on `processes` processes (cfg.check_world_size must accept them)."""
    from cap_common.models.families import load_hf_config
    from cap_common.models.pipeline import stage_parts

    family, config = load_hf_config(cfg.model_dir)
    config = getattr(config, "text_config", config)
    dtype = torch_dtype(cfg.model_dtype)
    size = torch.tensor([], dtype=dtype).element_size()
    cfg = replace(cfg, document_attention=uses_document_attention(cfg))
    n_layers, H, V = config.num_hidden_layers, config.hidden_size, config.vocab_size
    S = cfg.pipeline_stages
    dp = processes // S
    B, T, M = cfg.micro_batch_size, cfg.sequence_len, cfg.gradient_accumulation_steps
    tokens = B * T
    parts = stage_parts(n_layers, S)
    layers = _all_layer_bytes(family, config, cfg, dtype)
    first_trained = 0 if cfg.full_fine_tune else min(cfg.layers_to_transform or [0])
    saved_per_layer = (8 * H + 2 * _kv_dim(config) + 4 * _active_intermediate(config)) * tokens * size
    # 'selective' keeps the matmul and attention outputs: q, k, v, o, gate, up, down, the attention
    # output, and the layer input
    selective_per_layer = (5 * H + 2 * _kv_dim(config) + 2 * _active_intermediate(config)) * tokens * size
    tied = bool(getattr(config, "tie_word_embeddings", False))
    runtime = GPU_RUNTIME
    if device != "cuda":
        runtime = cpu_runtime() + (BNB_RUNTIME if cfg.load_in_4bit else 0)
        runtime += COMPILE_RUNTIME if cfg.compiles_layers else 0
    act_factor = CPU_ACTIVATION_FACTOR if device == "cpu" else 1.0
    on_disk = _tensor_bytes(cfg.model_dir) if device == "cpu" else {}
    plan = Plan(
        model=str(cfg.model_dir),
        device=device,
        processes=processes,
        pipeline_stages=S,
        data_parallel=dp,
        load_in_4bit=cfg.load_in_4bit,
        activation_checkpointing=cfg.activation_checkpointing,
        tokens_per_step=tokens * M * dp,
        bubble=(S - 1) / (M + S - 1),
        document_attention=cfg.document_attention,
    )
    for s in range(S):
        lo, hi = int(parts[s]), int(parts[s + 1])
        base = trainable = optimizer = 0.0
        backward = []  # the stage's decoder layers that backward reaches
        for position in range(lo, hi):
            if position == 0 or position == n_layers + 1:
                matrix = V * H * size
                shared = position == n_layers + 1 and tied and lo == 0  # the head reuses this stage's embedding
                norm = H * size if position == n_layers + 1 else 0
                if cfg.full_fine_tune:
                    trainable += (0 if shared else matrix) + norm
                    optimizer += 2 * ((0 if shared else matrix) + norm) * (1.5 if size == 2 else 1)
                else:
                    base += (0 if shared else matrix) + norm
                continue
            frozen, train, opt = layers[position - 1]
            base, trainable, optimizer = base + frozen, trainable + train, optimizer + opt
            if position - 1 >= first_trained:
                backward.append(position - 1)
        in_flight = min(S - s, M)
        layer_io = tokens * H * size
        pipe_buffers = 2 * layer_io * in_flight if S > 1 else 0
        modes = [layer_mode(cfg.activation_checkpointing, i) for i in backward]

        def saved(kinds: list[str | None]) -> float:
            """Bytes autograd keeps for the stage's micro batches in flight, layer by layer per mode."""
            kept = {None: saved_per_layer, "selective": selective_per_layer, "full": layer_io}
            kept["offload"] = 0.0 if device == "cuda" else layer_io  # on the host, not on the GPU
            total = sum(kept[k] for k in kinds) * in_flight
            whole = sum(k in ("full", "offload") for k in kinds)
            recomputed = saved_per_layer if whole else 0.0
            residue = CPU_RECOMPUTE_RESIDUE * whole * saved_per_layer if device == "cpu" else 0.0
            return act_factor * (total + recomputed) + residue + pipe_buffers

        masks = in_flight * _document_masks(cfg, family, config, range(max(lo, 1) - 1, min(hi, n_layers + 1) - 1), size)
        masks += 2 * B * T * T if masks else 0  # building one: the [B,T,T] boolean temporaries
        full = saved([None] * len(backward)) + masks
        checkpointed = saved(["full"] * len(backward)) + masks
        activations = saved(modes) + masks
        loss = 0.0
        if hi == n_layers + 2:
            rows = min(tokens, max(1, LOSS_CHUNK_BYTES // (4 * V)))
            chunk = rows * V * 4 * (CPU_LOSS_COPIES if device == "cpu" else 1)
            loss = chunk + tokens * H * 4 + (V * H * 4 if upcasts_head(device, dtype) else 0)
        prefixes = [_position_prefixes(p, n_layers, tied) for p in range(lo, hi)]
        pages = sum(b for name, b in on_disk.items() if any(name.startswith(x) for ps in prefixes for x in ps))
        plan.stages.append(
            StagePlan(
                stage=s,
                positions=(lo, hi - 1),
                base=base,
                trainable=trainable,
                gradients=trainable,
                optimizer=optimizer,
                activations_checkpointed=checkpointed,
                activations_full=full,
                activations=activations,
                loss=loss,
                runtime=runtime,
                file_pages=pages,
                masks=masks,
            )
        )
    return plan


def uses_document_attention(cfg: Config) -> bool:
    """The config's document_attention, or where it is left to cap-prep (None), cap-prep's choice
    from the datasets' formats (on for conversations); off when the inputs cannot be read now."""
    if cfg.document_attention is not None:
        return cfg.document_attention
    from cap_common.errors import CapError
    from cap_prep.build import document_attention, extracts, find_inputs

    try:
        return document_attention(cfg, extracts(cfg, find_inputs(cfg)))
    except (CapError, OSError):
        return False


def _document_masks(cfg: Config, family, config, layers: range, size: int) -> float:
    """Bytes of one micro batch's document masks on a stage with decoder `layers`: one additive
    [B,1,T,T] mask per distinct window among them (common/models/layers.py, document_mask); 0 without
    document_attention (cfg's, resolved by uses_document_attention)."""
    if not layers or not cfg.document_attention:
        return 0.0
    types = family.layer_types(config)
    windows = {types[i] == "sliding_attention" for i in layers}
    return len(windows) * cfg.micro_batch_size * cfg.sequence_len**2 * size


def _position_prefixes(position: int, n_layers: int, tied: bool) -> tuple[str, ...]:
    """Checkpoint tensor-name prefixes a pipeline position reads."""
    if position == 0:
        return ("model.embed_tokens.",)
    if position == n_layers + 1:
        return ("model.norm.", "lm_head.") + (("model.embed_tokens.",) if tied else ())
    return (f"model.layers.{position - 1}.",)


def _tensor_bytes(model_dir) -> dict[str, int]:
    """Tensor name → bytes on disk, from the safetensors headers of model_dir (none: {}); a multimodal
    checkpoint's text-model tensors by their text-model names, its other tensors left out."""
    import json
    from pathlib import Path

    from cap_common.models.loading import text_name, text_prefix

    out: dict[str, int] = {}
    for path in Path(model_dir).glob("*.safetensors"):
        with open(path, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        for name, info in header.items():
            if name != "__metadata__":
                start, end = info["data_offsets"]
                out[name] = end - start
    prefix = text_prefix(out)
    return {text_name(prefix, k): v for k, v in out.items() if text_name(prefix, k) is not None}


def smallest_fit(cfg: Config, gpu_bytes: float, four_bit: tuple[bool, ...] | None = None) -> tuple[int, bool] | None:
    """(pipeline_stages, load_in_4bit) with the fewest stages whose every stage fits in gpu_bytes on
    CUDA, over the 4-bit choices given (default: the config's, and 4-bit too unless it is a full
    fine-tune); the config's own choice wins a tie. None if nothing fits."""
    from cap_common.models.families import load_hf_config

    _, config = load_hf_config(cfg.model_dir)
    n_layers = getattr(config, "text_config", config).num_hidden_layers
    if four_bit is None:
        four_bit = (cfg.load_in_4bit,) if cfg.load_in_4bit or cfg.full_fine_tune else (False, True)
    cfg = replace(cfg, document_attention=uses_document_attention(cfg))  # decided once, not per trial
    best = None
    for option in four_bit:
        for stages in range(1, n_layers + 1):
            if best is not None and stages >= best[0]:
                break
            trial = replace(cfg, pipeline_stages=stages, load_in_4bit=option)
            if max(make_plan(trial, stages, "cuda").peaks()) <= gpu_bytes:
                best = (stages, option)
                break
    return best


def describe(plan: Plan, gpu_bytes: float | None = None, fit: tuple[int, bool] | None | str = "") -> list[str]:
    """The plan as the lines cap-train --plan prints."""
    unit, scale = ("GiB", GIB) if max(plan.peaks(False)) >= 4 * GIB else ("MiB", 2**20)
    lines = [
        f"plan: {plan.model} on {plan.processes} {plan.device.upper()} process(es) = {plan.pipeline_stages} "
        f"stage(s) × {plan.data_parallel} data-parallel; {'4-bit' if plan.load_in_4bit else 'full-precision'} base; "
        f"{plan.tokens_per_step:,} tokens per optimizer step; pipeline bubble {plan.bubble:.0%}"
        f"{'; document attention (its masks under activations)' if plan.document_attention else ''}",
        f"{unit} per process:",
        "  stage  positions      base  trainable+grad  optimizer  activations ckpt/full      loss   runtime      peak",
    ]
    for s in plan.stages:
        peak = s.peak()
        over = "  > --gpu-memory" if gpu_bytes is not None and peak > gpu_bytes else ""
        cells = [s.base, s.trainable + s.gradients, s.optimizer, s.activations_checkpointed, s.activations_full]
        base, train, opt, ckpt, full = (f"{c / scale:.2f}" for c in cells)
        tail = " ".join(f"{c / scale:9.2f}" for c in (s.loss, s.runtime, peak))
        where = f"{s.positions[0]}-{s.positions[1]}"
        lines.append(
            f"  {s.stage:5}  {where:>9}  {base:>8}  {train:>14}  {opt:>9}  {ckpt:>10} / {full:<10} {tail}{over}"
        )
    lines.append(
        f"peak per process with activation_checkpointing = {plan.activation_checkpointing!r} (this config): "
        f"{max(plan.peaks()) / GIB:.2f} GiB; every layer checkpointed: {max(plan.peaks(True)) / GIB:.2f} GiB; "
        f"none: {max(plan.peaks(False)) / GIB:.2f} GiB"
    )
    if gpu_bytes is not None and fit != "":
        if fit is None:
            lines.append(f"nothing fits in {gpu_bytes / GIB:g} GiB per GPU, even 4-bit with one layer per stage")
        else:
            stages, four_bit = fit
            lines.append(
                f"smallest that fits in {gpu_bytes / GIB:g} GiB per GPU: pipeline_stages = {stages}"
                f"{', load_in_4bit = true' if four_bit and not plan.load_in_4bit else ''}"
            )
    return lines
