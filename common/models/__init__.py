"""Model families, the pipeline model's layers, and layer-wise loading (see docs/architecture.md)."""

from cap_common.models.families import FAMILIES, Family, family_of, load_hf_config
from cap_common.models.layers import (
    IGNORE,
    DecoderLayerPipe,
    EmbeddingPipe,
    LmHeadPipe,
    WriterAdapter,
    causal_mask,
    labels_and_classes,
)
from cap_common.models.loading import Checkpoint, ModelSource, open_model, quantize_4bit
from cap_common.models.pipeline import (
    PARTITION_METHOD,
    StageBuilder,
    build_pipeline_layers,
    layer_specs,
    load_stage,
    stage_parts,
)
from cap_common.models.spec import ModelSpec

__all__ = [
    "FAMILIES",
    "Family",
    "family_of",
    "load_hf_config",
    "IGNORE",
    "DecoderLayerPipe",
    "EmbeddingPipe",
    "LmHeadPipe",
    "WriterAdapter",
    "causal_mask",
    "labels_and_classes",
    "Checkpoint",
    "ModelSource",
    "open_model",
    "quantize_4bit",
    "PARTITION_METHOD",
    "StageBuilder",
    "build_pipeline_layers",
    "layer_specs",
    "load_stage",
    "stage_parts",
    "ModelSpec",
]
