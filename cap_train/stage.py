"""This rank's pipeline stage as DeepSpeed's PipelineModule, with checkpoints that hold trainable
state only.

DeepSpeed's `exclude_frozen_parameters` drops the frozen *parameters* from each layer's saved state
dict, but not what else a frozen module puts there: bitsandbytes' 4-bit base adds `absmax`,
`quant_map`, `nested_*` and `quant_state.*` entries per quantized weight (~1 GB per checkpoint for
a 70B QLoRA), and persistent buffers would follow. Here every state-dict entry that is not a
trainable parameter counts as frozen, so a checkpoint layer file holds exactly the trainable
parameters (loaded back with strict=False, the frozen base coming from model_dir).
"""

from __future__ import annotations

from deepspeed.pipe import LayerSpec, PipelineModule
from torch import nn


class TrainableStatePipe(PipelineModule):
    def _get_frozen_parameter_names(self, layer):
        if isinstance(layer, LayerSpec):
            layer = layer.build()
        if not isinstance(layer, nn.Module):
            return []
        trainable = {name for name, p in layer.named_parameters() if p.requires_grad}
        return [name for name in layer.state_dict(keep_vars=True) if name not in trainable]
