"""Model families, the pipeline model's layers, and layer-wise loading (see docs/architecture.md).

The names below load their module on first use (PEP 562), so that importing a torch-free module of
this package (`families`, which the config loader reads) does not import torch: cap-train's launcher
process starts in a fraction of a second.
"""

import importlib

_MODULE = {
    **dict.fromkeys(["FAMILIES", "Family", "family_of", "load_hf_config"], "families"),
    **dict.fromkeys(
        ["IGNORE", "DecoderLayerPipe", "EmbeddingPipe", "LmHeadPipe", "WriterAdapter", "causal_mask"], "layers"
    ),
    "labels_and_classes": "layers",
    **dict.fromkeys(["Checkpoint", "ModelSource", "open_model", "quantize_4bit"], "loading"),
    **dict.fromkeys(
        ["PARTITION_METHOD", "StageBuilder", "build_pipeline_layers", "layer_specs", "load_stage", "stage_parts"],
        "pipeline",
    ),
    "ModelSpec": "spec",
}
__all__ = list(_MODULE)


def __getattr__(name: str):
    if name not in _MODULE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_MODULE[name]}"), name)
