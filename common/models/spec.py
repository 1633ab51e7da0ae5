"""ModelSpec: what the pipeline model builder (cap_common.models.pipeline) needs to know.

cap-train makes one from its Config (`ModelSpec.from_config`); cap-export verify from a trained
Control Adapter and the base model folder (`ModelSpec.control_adapter`). See docs/architecture.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Literal

import torch

from cap_common.dtypes import torch_dtype

if TYPE_CHECKING:
    from cap_common.config import Config

Mode = Literal["control", "lora", "qlora", "full"]


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """The base model, the dtype it is built in, and what is trained on it.

    mode: "control" → Control Adapters; "lora" / "qlora" → LoRA pairs on target_modules (qlora on
    a 4-bit base); "full" → every weight. Adapters go on layers_to_transform (None = all) and are
    initialized from seed and the layer index. `source` (a config file or an adapter folder)
    starts error messages. document_attention: the micro batches carry position_ids, and each token
    attends only to its own document's tokens (common/models/layers.py, document_mask).
    """

    model_dir: Path
    dtype: torch.dtype  # the base weights (not quantized ones)
    mode: Mode
    source: Path
    load_in_4bit: bool = False
    pipeline_stages: int = 1
    layers_to_transform: tuple[int, ...] | None = None
    rank: int | None = None  # adapter rank r (None for "full")
    alpha: float | None = None  # adapter scale = alpha / rank
    dropout: float = 0.0  # on the adapter input
    adapter_dtype: torch.dtype = torch.float32
    seed: int = 0
    control_adapter_type: str = "full"
    control_adapter_target: str = "block"
    target_modules: tuple[str, ...] | None = None  # LoRA targets (None: every linear)
    activation_checkpointing: bool | str | int = False  # per-layer mode: common/models/recompute.py
    compile_layers: bool = False  # torch.compile each decoder layer (Config.compiles_layers)
    # packed rows hold several documents, each attending only to itself (position_ids restart at 0)
    document_attention: bool = False

    @property
    def trainable_base(self) -> bool:
        """Whether the base weights train (a full fine-tune)."""
        return self.mode == "full"

    @classmethod
    def from_config(cls, cfg: Config, document_attention: bool = False) -> ModelSpec:
        """The model a cap-train Config describes; document_attention as the prepared data says
        (its manifest, cap_prep.shards.Split.document_attention)."""
        return cls(
            model_dir=Path(cfg.model_dir),
            dtype=torch_dtype(cfg.model_dtype),
            mode=cfg.mode,
            source=Path(cfg.source),
            load_in_4bit=cfg.load_in_4bit,
            pipeline_stages=cfg.pipeline_stages,
            layers_to_transform=cfg.layers_to_transform,
            rank=cfg.lora_rank,
            alpha=None if cfg.lora_rank is None else cfg.alpha,
            dropout=cfg.lora_dropout,
            adapter_dtype=torch_dtype(cfg.lora_weight_dtype),
            seed=cfg.seed,
            control_adapter_type=cfg.control_adapter_type,
            control_adapter_target=cfg.control_adapter_target,
            target_modules=cfg.target_modules,
            activation_checkpointing=cfg.activation_checkpointing,
            compile_layers=cfg.compiles_layers,
            document_attention=document_attention,
        )

    @classmethod
    def control_adapter(
        cls,
        model_dir: Path,
        dtype: torch.dtype,
        *,
        source: Path,
        rank: int,
        alpha: float,
        adapter_type: str,
        target: str,
        layers: Iterable[int],
    ) -> ModelSpec:
        """A trained Control Adapter (read from `source`, an adapter folder) on the base model
        `model_dir`: float32 adapters on `layers`, no dropout, whole model in one stage."""
        return cls(
            model_dir=Path(model_dir),
            dtype=dtype,
            mode="control",
            source=Path(source),
            rank=rank,
            alpha=alpha,
            layers_to_transform=tuple(layers),
            control_adapter_type=adapter_type,
            control_adapter_target=target,
        )
