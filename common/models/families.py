"""What differs between the supported model families, as data: one `Family` per `model_type`.

Everything else (building, loading, the pipeline) is generic code that reads these fields.
The transformers classes are named, not imported, so importing this module stays cheap.

Block shapes (h: residual stream, n: norm):
  sequential  h += attn(n(h));  h += mlp(n(h))                       Llama, Mistral, Mixtral, Qwen, Phi-3
  parallel    h += attn(n(h)) + mlp(n(h))   (one norm, one add)       Cohere, Cohere 2
  sandwich    h += n(attn(n(h)));  h += n(mlp(n(h)))   (post-norms)   Gemma 2
The residual writers are the modules whose output is added into h (before any post-norm); the
"writers" control adapter target and cap-export's multiplicative LoRA act on exactly these.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from cap_common.errors import CapError

# A checkpoint source: (tensor name relative to the layer prefix, index into the module tensor).
Source = tuple[str, tuple]
WHOLE: tuple = (...,)


@dataclass(frozen=True)
class Family:
    model_type: str
    module: str  # transformers.models.<module>.modeling_<module>
    layer: str  # decoder layer class, built as cls(config, layer_idx)
    norm: str  # final norm class, built as cls(hidden_size, eps=...)
    rotary: str  # rotary embedding class, built as cls(config=config)
    block: str = "sequential"  # "sequential" | "parallel" | "sandwich" (see module docstring)
    writers: tuple[str, ...] = ("self_attn.o_proj", "mlp.down_proj")
    norm_eps: str = "rms_norm_eps"  # config attribute holding the norms' epsilon
    sliding: str = "none"  # which layers use sliding-window attention:
    #   "none", "all" (every layer when config.sliding_window is set),
    #   "layer_types" (config.layer_types[i] == "sliding_attention")
    attention: str = "sdpa"  # attention implementation: "sdpa", or "eager" where sdpa is wrong
    experts: str | None = None  # MoE experts implementation (transformers' default "grouped_mm")
    embed_scale: bool = False  # embeddings × √hidden_size (cast to the weight dtype)
    logit_scale: bool = False  # logits × config.logit_scale
    final_softcap: bool = False  # logits = cap·tanh(logits/cap), cap = config.final_logit_softcapping
    keep_unquantized: tuple[str, ...] = ()  # linear modules never quantized besides embedding / LM head
    fused_experts: str | None = None  # MoE experts with fused 3-D weights, quantized per expert for 4-bit
    sources: Callable[[str, object], list[Source]] | None = None
    """Where a module tensor comes from in the checkpoint, if not from the same name (see `tensor_sources`)."""

    def modeling(self):
        return importlib.import_module(f"transformers.models.{self.module}.modeling_{self.module}")

    def cls(self, name: str) -> type:
        return getattr(self.modeling(), getattr(self, name))

    def layer_types(self, config) -> list[str]:
        """'full_attention' or 'sliding_attention' for every decoder layer."""
        n = config.num_hidden_layers
        if self.sliding == "layer_types":
            return list(config.layer_types)
        if self.sliding == "all" and getattr(config, "sliding_window", None):
            return ["sliding_attention"] * n
        return ["full_attention"] * n


def _mixtral_sources(key: str, config) -> list[Source]:
    """Mixtral checkpoints keep one tensor per expert (`block_sparse_moe.experts.{e}.w1/w2/w3`);
    transformers v5 modules hold them fused: gate_up_proj [E, 2I, H] = [w1; w3] per expert,
    down_proj [E, H, I] = w2 per expert; the router `gate` keeps its name under block_sparse_moe."""
    inter = config.intermediate_size
    experts = range(config.num_local_experts)
    legacy = "block_sparse_moe.experts.{}.{}.weight"
    if key == "mlp.experts.gate_up_proj":
        return [(legacy.format(e, "w1"), (e, slice(0, inter))) for e in experts] + [
            (legacy.format(e, "w3"), (e, slice(inter, 2 * inter))) for e in experts
        ]
    if key == "mlp.experts.down_proj":
        return [(legacy.format(e, "w2"), (e,)) for e in experts]
    if key.startswith("mlp."):
        return [("block_sparse_moe." + key[len("mlp.") :], WHOLE)]
    return [(key, WHOLE)]


FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family("llama", "llama", "LlamaDecoderLayer", "LlamaRMSNorm", "LlamaRotaryEmbedding"),
        Family("mistral", "mistral", "MistralDecoderLayer", "MistralRMSNorm", "MistralRotaryEmbedding", sliding="all"),
        # Experts are fused 3-D parameters in v5, not Linear modules: the writer is the experts module
        # as a whole. Its output is Σ_e w_e·down_e(x), so a linear map of it equals the map applied
        # to every expert's down projection. The router never gets quantized.
        Family(
            "mixtral",
            "mixtral",
            "MixtralDecoderLayer",
            "MixtralRMSNorm",
            "MixtralRotaryEmbedding",
            writers=("self_attn.o_proj", "mlp.experts"),
            sliding="all",
            experts="grouped_mm",
            keep_unquantized=("mlp.gate",),
            fused_experts="mlp.experts",
            sources=_mixtral_sources,
        ),
        Family("qwen2", "qwen2", "Qwen2DecoderLayer", "Qwen2RMSNorm", "Qwen2RotaryEmbedding", sliding="layer_types"),
        Family("qwen3", "qwen3", "Qwen3DecoderLayer", "Qwen3RMSNorm", "Qwen3RotaryEmbedding", sliding="layer_types"),
        Family(
            "cohere",
            "cohere",
            "CohereDecoderLayer",
            "CohereLayerNorm",
            "CohereRotaryEmbedding",
            block="parallel",
            norm_eps="layer_norm_eps",
            logit_scale=True,
        ),
        Family(
            "cohere2",
            "cohere2",
            "Cohere2DecoderLayer",
            "Cohere2LayerNorm",
            "Cohere2RotaryEmbedding",
            block="parallel",
            norm_eps="layer_norm_eps",
            sliding="layer_types",
            logit_scale=True,
        ),
        # sdpa has no attention-logit softcapping: Gemma 2 runs eager attention.
        Family(
            "gemma2",
            "gemma2",
            "Gemma2DecoderLayer",
            "Gemma2RMSNorm",
            "Gemma2RotaryEmbedding",
            block="sandwich",
            sliding="layer_types",
            attention="eager",
            embed_scale=True,
            final_softcap=True,
        ),
        # Fused qkv_proj and gate_up_proj; the writers are the usual two.
        Family("phi3", "phi3", "Phi3DecoderLayer", "Phi3RMSNorm", "Phi3RotaryEmbedding", sliding="all"),
    )
}


def tensor_sources(family: Family, key: str, config) -> list[Source]:
    """Checkpoint tensors (names relative to `model.layers.{i}.`) that fill module tensor `key`,
    each with the index of the part it fills."""
    return family.sources(key, config) if family.sources else [(key, WHOLE)]


def check_model_type(config: dict, where: str = "config.json") -> Family:
    """The family of a config.json's contents; one line naming the supported model_types otherwise. A
    multimodal model (its text model's config under text_config, e.g. mistral3) is named as one."""
    model_type = config.get("model_type", "<missing>")
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    text = config.get("text_config")
    why = "is not supported"
    if isinstance(text, dict):
        why = (
            f"is a multimodal model (its text model, a {text.get('model_type', 'decoder')} decoder, is under "
            "text_config) and cap trains text-only models: extract the text model into a folder of its own (its "
            "config.json = text_config, weights without the language_model prefix)"
        )
    raise CapError(f"{where}: model_type '{model_type}' {why}; supported model_types: {', '.join(FAMILIES)}")


def family_of(model_type: str, where: str = "config.json") -> Family:
    return check_model_type({"model_type": model_type}, where)


def load_hf_config(model_dir: Path):
    """The model's transformers config, with the family's attention implementation set.

    Returns (family, config). An unsupported model_type is a CapError naming the supported ones.
    """
    import transformers

    path = Path(model_dir) / "config.json"
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CapError(f"{path}: cannot read the model config ({e})") from None
    family = check_model_type(raw if isinstance(raw, dict) else {}, str(path))
    config = transformers.AutoConfig.from_pretrained(model_dir)
    config._attn_implementation = family.attention
    if family.experts:
        config._experts_implementation = family.experts
    return family, config
