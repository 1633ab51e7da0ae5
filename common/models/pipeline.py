"""The pipeline model of a ModelSpec: its layers, which stage holds which, and building one stage.

Pipeline positions: 0 = embedding, 1..N = decoder layers 0..N−1, N+1 = final norm + LM head.
Stage s holds positions [parts[s], parts[s+1]) with `parts = stage_parts(N, stages)`, the same
split DeepSpeed makes with partition_method=PARTITION_METHOD (equal numbers of decoder layers).

For cap-train (spec = ModelSpec.from_config(cfg)):
    specs = layer_specs(spec, device, loss_fn)     # lazy: DeepSpeed builds only its stage's
    PipelineModule(layers=specs, num_stages=spec.pipeline_stages, loss_fn=None,
                   partition_method=PARTITION_METHOD, activation_checkpoint_interval=0)
(each decoder layer checkpoints itself as spec.activation_checkpointing says: common/models/recompute.py)
Outside DeepSpeed (tests, cap-export verify): `build_pipeline_layers(spec, device, stage)`
gives the modules themselves; running them in order maps (input_ids, control_class) to logits, or
(input_ids, control_class, position_ids) with spec.document_attention (attention within documents).

Trainable parameters by spec.mode: control → the control adapters; lora / qlora → the LoRA pairs
(qlora on a 4-bit base); full → everything. Adapters go only on layers_to_transform (None = all)
and are initialized from a seed derived from spec.seed and the layer index, so any split into
stages gives the same model.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from typing import Iterable

import torch
from torch import nn

from cap_common.adapters.control import ControlAdapter
from cap_common.adapters.lora import inject_lora
from cap_common.errors import CapError
from cap_common.models.layers import DecoderLayerPipe, EmbeddingPipe, LmHeadPipe, LossFn
from cap_common.models.loading import (
    ModelSource,
    load_decoder_layer,
    load_embedding,
    load_final_norm,
    load_lm_head,
    meta_decoder_layer,
    open_model,
    release_host_memory,
    rotary_embedding,
)
from cap_common.models.recompute import layer_mode
from cap_common.models.spec import ModelSpec

PARTITION_METHOD = "type:DecoderLayerPipe"


def stage_parts(num_layers: int, stages: int) -> list[int]:
    """Stage boundaries over the N+2 pipeline positions, exactly as DeepSpeed's PARTITION_METHOD."""
    from deepspeed.runtime.utils import partition_balanced

    return partition_balanced([0] + [1] * num_layers + [0], stages)


def linear_names(layer: nn.Module) -> tuple[str, ...]:
    """Names (last component) of the nn.Linear modules of a decoder layer."""
    return tuple(sorted({n.rpartition(".")[2] for n, m in layer.named_modules() if isinstance(m, nn.Linear)}))


def layer_writers(family, layer: nn.Module) -> tuple[str, ...]:
    """The family's residual writers that this decoder layer has (an MoE layer its experts, a dense
    layer of the same model its down_proj)."""
    present = []
    for name in family.writers:
        try:
            layer.get_submodule(name)
        except AttributeError:
            continue
        present.append(name)
    return tuple(present)


def base_weight_trains(
    target_modules: tuple[str, ...] | None, layers: tuple[int, ...] | None, hf_name: str, layer: int | None
) -> bool:
    """In a full fine-tune, whether the base weight `hf_name` (of decoder layer `layer`, None outside
    the layers) trains: some target_modules entry is a substring of its name and the layer is in
    layers_to_transform (qlora-pipe-lite's rule; an unset key selects all)."""
    in_layers = layer is None or layers is None or layer in layers
    return in_layers and (target_modules is None or any(t in hf_name for t in target_modules))


@contextlib.contextmanager
def _seeded(seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class StageBuilder:
    """Builds the pipeline positions of a ModelSpec, one at a time, onto `device`.

    `source` is the opened model folder when the caller has it already (default: spec.model_dir)."""

    def __init__(
        self,
        spec: ModelSpec,
        device: str | torch.device = "cpu",
        loss_fn: LossFn | None = None,
        source: ModelSource | None = None,
    ):
        self.spec, self.dtype, self.device, self.loss_fn = spec, spec.dtype, torch.device(device), loss_fn
        self.source = source or open_model(spec.model_dir)
        self.num_layers = self.source.num_layers
        self.trainable_base = spec.trainable_base
        self.tied = bool(getattr(self.source.config, "tie_word_embeddings", False))
        self._embedding: nn.Embedding | None = None  # kept to tie the LM head to, when both are built here
        if self.trainable_base and spec.pipeline_stages > 1 and self.tied:
            # Each end would train its own copy of the tied matrix (no DeepSpeed TiedLayerSpec yet).
            raise CapError(
                f"{spec.source}: full_fine_tune of a model with tied embeddings ({spec.model_dir.name}) "
                "needs pipeline_stages = 1"
            )

    @functools.cached_property
    def linear_names(self) -> tuple[str, ...]:
        """Names (last component) of the nn.Linear modules of the unquantized decoder layers (of every
        kind: an MoE model's dense layers have an MLP its MoE layers lack)."""
        family, config = self.source.family, self.source.config
        names = {n for i in range(self.num_layers) for n in linear_names(meta_decoder_layer(family, config, i))}
        return tuple(sorted(names))

    @property
    def lora_targets(self) -> tuple[str, ...]:
        """spec.target_modules, by default every linear of the unquantized layer: the same modules
        with and without 4-bit (whose per-expert linears of fused MoE experts are not targets)."""
        return self.spec.target_modules or self.linear_names

    def _select_trainable(self, module: nn.Module, prefix: str, layer: int | None = None) -> None:
        """Base weights train only in a full fine-tune, and there (qlora-pipe-lite's rule) only where
        some target_modules entry is a substring of the weight's Hugging Face name `prefix + name`
        and, for a decoder layer, its index is in layers_to_transform; an unset key selects all."""
        spec = self.spec
        for name, p in module.named_parameters():
            p.requires_grad_(
                self.trainable_base
                and base_weight_trains(spec.target_modules, spec.layers_to_transform, prefix + name, layer)
            )

    def position_class(self, position: int) -> type[nn.Module]:
        if position == 0:
            return EmbeddingPipe
        return LmHeadPipe if position == self.num_layers + 1 else DecoderLayerPipe

    def build(self, position: int) -> nn.Module:
        if position == 0:
            module = self.embedding()
        elif position == self.num_layers + 1:
            module = self.head()
        else:
            module = self.decoder_layer(position - 1)
        module = module.to(self.device)
        if self.device.type != "cpu":
            release_host_memory()
        return module

    def embedding(self) -> EmbeddingPipe:
        family, config = self.source.family, self.source.config
        embed = load_embedding(self.source, self.dtype)
        self._select_trainable(embed, "model.embed_tokens.")
        self._embedding = embed
        multiplier = getattr(config, family.embed_multiplier) if family.embed_multiplier else None
        return EmbeddingPipe(embed, config.hidden_size**0.5 if family.embed_scale else None, multiplier)

    def head(self) -> LmHeadPipe:
        family, config = self.source.family, self.source.config
        norm = load_final_norm(self.source, self.dtype)
        self._select_trainable(norm, "model.norm.")
        if self.tied and self._embedding is not None:  # one matrix for both ends of this stage
            head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, device="meta")
            head.weight = self._embedding.weight
        else:
            head = load_lm_head(self.source, self.dtype)
            self._select_trainable(head, "lm_head.")
        logit_scale = config.logit_scale if family.logit_scale else None
        if family.logit_divisor:  # Granite divides; × 1/d is the same for its powers of two
            logit_scale = 1.0 / getattr(config, family.logit_divisor)
        return LmHeadPipe(
            norm,
            head,
            logit_scale=logit_scale,
            softcap=config.final_logit_softcapping if family.final_softcap else None,
            loss_fn=self.loss_fn,
        )

    def decoder_layer(self, index: int) -> DecoderLayerPipe:
        spec, family, config = self.spec, self.source.family, self.source.config
        layer = load_decoder_layer(self.source, index, self.dtype, quantize=spec.load_in_4bit)
        self._select_trainable(layer, f"model.layers.{index}.", index)
        transformed = spec.layers_to_transform is None or index in spec.layers_to_transform
        adapter = None
        if transformed and spec.mode in ("control", "lora", "qlora"):
            with _seeded(spec.seed * 1_000_003 + index):
                if spec.mode == "control":
                    adapter = ControlAdapter(
                        config.hidden_size,
                        spec.rank,
                        spec.alpha,
                        spec.control_adapter_type,
                        spec.dropout,
                        spec.adapter_dtype,
                    )
                else:
                    targets = self.lora_targets
                    if not inject_lora(layer, targets, spec.rank, spec.alpha, spec.dropout, spec.adapter_dtype):
                        raise CapError(
                            f"{spec.source}: target_modules = {list(targets)} match no linear module of "
                            f"decoder layer {index}; its linear modules: {', '.join(self.linear_names)}"
                        )
        layer_type = family.layer_types(config)[index]
        if spec.compile_layers:
            compile_layer(layer, self.device)
        return DecoderLayerPipe(
            layer,
            index,
            rotary_embedding(self.source),
            config.sliding_window if layer_type == "sliding_attention" else None,
            family.attention,
            adapter,
            spec.control_adapter_target,
            layer_writers(family, layer),
            layer_mode(spec.activation_checkpointing, index),
            spec.document_attention,
            layer_type if family.rotary_per_type else None,
        )


@functools.lru_cache(maxsize=None)
def can_compile(device_type: str) -> bool:
    """Whether torch.compile can build kernels for this device: on CPU, inductor needs a working C++
    compiler (once per process, a one-line warning when there is none)."""
    if device_type != "cpu":
        return True
    from torch._inductor import cpp_builder

    try:
        cpp_builder.get_cpp_compiler()
    except Exception as error:  # InvalidCxxCompiler, or any failure probing for one
        print(
            f"cap: warning: compile_layers = true, but {error}; the layers run uncompiled", file=sys.stderr, flush=True
        )
        return False
    return True


def compile_layer(layer: nn.Module, device: torch.device) -> None:
    """torch.compile a transformers decoder layer in place (its parameter names stay). Layers of one
    model share the compiled code: their parameters are its inputs. Where torch still cannot
    compile (an op dynamo cannot trace) the layer runs uncompiled, with dynamo's warning, rather
    than stopping the run. Random ops (dropout) draw from torch's own generator as eagerly, so
    masks do not depend on whether a layer is compiled."""
    if not can_compile(device.type):
        return
    import torch._inductor.config

    torch._dynamo.config.suppress_errors = True
    torch._inductor.config.fallback_random = True
    layer.compile()


def load_stage(
    spec: ModelSpec, positions: Iterable[int], device: str | torch.device = "cpu", loss_fn: LossFn | None = None
) -> list[nn.Module]:
    """The modules of the given pipeline positions, built, loaded and moved to `device` one by one.

    Only these positions' tensors are read. With tied embeddings, an LM head built after the
    embedding by the same builder shares its weight.
    """
    builder = StageBuilder(spec, device, loss_fn)
    return [builder.build(p) for p in positions]


def build_pipeline_layers(
    spec: ModelSpec, device: str | torch.device = "cpu", stage: int | None = None, loss_fn: LossFn | None = None
) -> list[nn.Module]:
    """The layers of pipeline stage `stage` of spec.pipeline_stages (None: the whole model)."""
    builder = StageBuilder(spec, device, loss_fn)
    positions = range(builder.num_layers + 2)
    if stage is not None:
        parts = stage_parts(builder.num_layers, spec.pipeline_stages)
        positions = range(parts[stage], parts[stage + 1])
    return [builder.build(p) for p in positions]


def layer_specs(spec: ModelSpec, device: str | torch.device = "cpu", loss_fn: LossFn | None = None) -> list:
    """DeepSpeed LayerSpecs of all N+2 positions; building one loads just that position."""
    from deepspeed.pipe import LayerSpec

    class LoadSpec(LayerSpec):
        def __init__(self, builder: StageBuilder, position: int):
            super().__init__(builder.position_class(position))
            self.builder, self.position = builder, position

        def __repr__(self) -> str:
            return f"{self.typename.__name__}(position={self.position})"

        def build(self, log: bool = False) -> nn.Module:
            return self.builder.build(self.position)

    builder = StageBuilder(spec, device, loss_fn)
    return [LoadSpec(builder, p) for p in range(builder.num_layers + 2)]
