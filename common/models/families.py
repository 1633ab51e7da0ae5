"""What differs between the supported model families, as data: one `Family` per `model_type`.

Everything else (building, loading, the pipeline) is generic code that reads these fields.
The transformers classes are named, not imported, so importing this module stays cheap.

Block shapes (h: residual stream, n: norm):
  sequential  h += attn(n(h));  h += mlp(n(h))              Llama, Mistral, Mixtral, Qwen 2/3, Qwen3-MoE, Phi-3,
                                                            SmolLM3, Ministral 3, GPT-OSS, DeepSeek-V3, GLM-4.5,
                                                            Granite (× residual_multiplier)
  parallel    h += attn(n(h)) + mlp(n(h))   (one norm, one add)       Cohere, Cohere 2
  sandwich    h += n(attn(n(h)));  h += n(mlp(n(h)))   (post-norms)   Gemma 2, Gemma 3, GLM-4
  postnorm    h += n(attn(h));  h += n(mlp(h))   (no pre-norms)       OLMo 2, OLMo 3
The residual writers are the modules whose output is added into h (before any post-norm); the
"writers" control adapter target and cap-export's multiplicative LoRA act on exactly these. In a
model whose MoE layers alternate with dense ones (Qwen3-MoE's mlp_only_layers) a layer's writers are
those of `writers` it has.

The decoder layers are transformers' own, called with the rotary embedding of the layer's type and
the layer's mask; what happens outside them (embedding and logit multipliers, softcapping) is listed
per family below, and nothing else differs.
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
    embed_multiplier: str | None = None  # config attribute the embeddings are multiplied by (Granite)
    logit_scale: bool = False  # logits × config.logit_scale
    logit_divisor: str | None = None  # config attribute the logits are divided by (Granite: logits_scaling)
    rotary_per_type: bool = False  # the rotary module computes each layer type's own (Gemma 3, OLMo 3)
    final_softcap: bool = False  # logits = cap·tanh(logits/cap), cap = config.final_logit_softcapping
    keep_unquantized: tuple[str, ...] = ()  # linear modules never quantized besides embedding / LM head
    fused_experts: str | None = None  # MoE experts with fused 3-D weights, quantized per expert for 4-bit
    fp32_modules: tuple[str, ...] = ()  # kept in float32 whatever model_dtype (as transformers keeps them)
    peft_loads_experts: bool = False  # PEFT (with transformers 5.24) loads a LoRA on each expert's weight
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


def _split_experts(key: str, name: str, gate: str, up: str, down: str, inter: int, experts: int) -> list[Source] | None:
    """The sources of fused experts held one tensor per expert in the checkpoint (`name.format(e, leaf)`):
    gate_up_proj [E, 2I, H] = [gate; up] per expert, down_proj [E, H, I] = down per expert; None for
    any other module tensor."""
    if key == "mlp.experts.gate_up_proj":
        return [(name.format(e, gate), (e, slice(0, inter))) for e in range(experts)] + [
            (name.format(e, up), (e, slice(inter, 2 * inter))) for e in range(experts)
        ]
    if key == "mlp.experts.down_proj":
        return [(name.format(e, down), (e,)) for e in range(experts)]
    return None


def _mixtral_sources(key: str, config) -> list[Source]:
    """Mixtral checkpoints keep one tensor per expert (`block_sparse_moe.experts.{e}.w1/w2/w3`);
    transformers v5 modules hold them fused (w1 = gate, w3 = up, w2 = down); the router `gate` keeps
    its name under block_sparse_moe."""
    legacy = "block_sparse_moe.experts.{}.{}.weight"
    split = _split_experts(key, legacy, "w1", "w3", "w2", config.intermediate_size, config.num_local_experts)
    if split is not None:
        return split
    if key.startswith("mlp."):
        return [("block_sparse_moe." + key[len("mlp.") :], WHOLE)]
    return [(key, WHOLE)]


def _per_expert_sources(key: str, config) -> list[Source]:
    """Qwen3-MoE (and the DeepSeek-style) checkpoints keep one tensor per expert
    (`mlp.experts.{e}.gate_proj/up_proj/down_proj.weight`, as the hub and save_pretrained write them)."""
    experts = config.num_experts if hasattr(config, "num_experts") else config.n_routed_experts
    name = "mlp.experts.{}.{}.weight"
    split = _split_experts(key, name, "gate_proj", "up_proj", "down_proj", config.moe_intermediate_size, experts)
    return split if split is not None else [(key, WHOLE)]


_GRANITEMOE_NAMES = {
    "block_sparse_moe.experts.gate_up_proj": "block_sparse_moe.input_linear.weight",
    "block_sparse_moe.experts.down_proj": "block_sparse_moe.output_linear.weight",
    "block_sparse_moe.router.weight": "block_sparse_moe.router.layer.weight",
}


def _granitemoe_sources(key: str, config) -> list[Source]:
    """Granite MoE checkpoints (hub and save_pretrained) keep the experts fused under their earlier
    names: input_linear [E, 2I, H], output_linear [E, H, I], router.layer [E, H]."""
    return [(_GRANITEMOE_NAMES.get(key, key), WHOLE)]


def _deepseek_moe(model_type: str, prefix: str) -> Family:
    """A family with DeepSeek's MoE layers (GLM-4.5 has the same): routed + shared experts, dense first layers."""
    return Family(
        model_type,
        model_type,
        f"{prefix}DecoderLayer",
        f"{prefix}RMSNorm",
        f"{prefix}RotaryEmbedding",
        writers=("self_attn.o_proj", "mlp.experts", "mlp.shared_experts.down_proj", "mlp.down_proj"),
        experts="grouped_mm",
        keep_unquantized=("mlp.gate",),
        fused_experts="mlp.experts",
        fp32_modules=("mlp.gate",),
        sources=_per_expert_sources,
    )


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
            peft_loads_experts=True,
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
        # Local (sliding) and global layers rotate with their own base; QK-norm inside the attention.
        Family(
            "gemma3_text",
            "gemma3",
            "Gemma3DecoderLayer",
            "Gemma3RMSNorm",
            "Gemma3RotaryEmbedding",
            block="sandwich",
            sliding="layer_types",
            embed_scale=True,
            final_softcap=True,
            rotary_per_type=True,
        ),
        # MoE layers (fused experts; router `mlp.gate`, softmax top-k) and dense ones (mlp_only_layers,
        # decoder_sparse_step); checkpoints keep one tensor per expert.
        Family(
            "qwen3_moe",
            "qwen3_moe",
            "Qwen3MoeDecoderLayer",
            "Qwen3MoeRMSNorm",
            "Qwen3MoeRotaryEmbedding",
            writers=("self_attn.o_proj", "mlp.experts", "mlp.down_proj"),
            sliding="all",
            experts="grouped_mm",
            keep_unquantized=("mlp.gate",),
            fused_experts="mlp.experts",
            sources=_per_expert_sources,
        ),
        # DeepSeek-style MoE: dense first layers (first_k_dense_replace), shared experts beside the routed
        # ones, a sigmoid router with grouped top-k and a score correction bias, both kept in float32.
        # DeepSeek-V3 adds multi-head latent attention (q/kv low-rank projections with their norms).
        _deepseek_moe("glm4_moe", "Glm4Moe"),
        _deepseek_moe("deepseek_v3", "DeepseekV3"),
        # Partial rotary (interleaved pairs), fused gate_up_proj, post-norms after attention and MLP.
        Family("glm4", "glm4", "Glm4DecoderLayer", "Glm4RMSNorm", "Glm4RotaryEmbedding", block="sandwich"),
        Family("olmo2", "olmo2", "Olmo2DecoderLayer", "Olmo2RMSNorm", "Olmo2RotaryEmbedding", block="postnorm"),
        Family(
            "olmo3",
            "olmo3",
            "Olmo3DecoderLayer",
            "Olmo3RMSNorm",
            "Olmo3RotaryEmbedding",
            block="postnorm",
            sliding="layer_types",
            rotary_per_type=True,
        ),
        # Every no_rope_layer_interval-th layer has no rotary (the attention skips it itself).
        Family(
            "smollm3",
            "smollm3",
            "SmolLM3DecoderLayer",
            "SmolLM3RMSNorm",
            "SmolLM3RotaryEmbedding",
            sliding="layer_types",
        ),
        # The attention scales queries by position (llama_4_scaling_beta) from position_ids.
        Family(
            "ministral3",
            "ministral3",
            "Ministral3DecoderLayer",
            "Ministral3RMSNorm",
            "Ministral3RotaryEmbedding",
            sliding="all",
        ),
        # attention_multiplier and residual_multiplier act inside the layer.
        Family(
            "granite",
            "granite",
            "GraniteDecoderLayer",
            "GraniteRMSNorm",
            "GraniteRotaryEmbedding",
            embed_multiplier="embedding_multiplier",
            logit_divisor="logits_scaling",
        ),
        Family(
            "granitemoe",
            "granitemoe",
            "GraniteMoeDecoderLayer",
            "GraniteMoeRMSNorm",
            "GraniteMoeRotaryEmbedding",
            writers=("self_attn.o_proj", "block_sparse_moe.experts"),
            experts="grouped_mm",
            keep_unquantized=("block_sparse_moe.router",),
            fused_experts="block_sparse_moe.experts",
            embed_multiplier="embedding_multiplier",
            logit_divisor="logits_scaling",
            sources=_granitemoe_sources,
        ),
        # Attention sinks (a learned logit per head that takes part in the softmax: eager attention), q/k/v/o
        # with biases, alternating sliding layers; MoE experts with biases, in a transposed layout
        # (gate_up_proj [E, H, 2I] with gate and up interleaved, down_proj [E, I, H]) and a clamped SwiGLU,
        # a biased router. 4-bit keeps the experts in model_dtype (only nn.Linear modules are quantized).
        Family(
            "gpt_oss",
            "gpt_oss",
            "GptOssDecoderLayer",
            "GptOssRMSNorm",
            "GptOssRotaryEmbedding",
            writers=("self_attn.o_proj", "mlp.experts"),
            sliding="layer_types",
            attention="eager",
        ),
    )
}


def tensor_sources(family: Family, key: str, config) -> list[Source]:
    """Checkpoint tensors (names relative to `model.layers.{i}.`) that fill module tensor `key`,
    each with the index of the part it fills."""
    return family.sources(key, config) if family.sources else [(key, WHOLE)]


# Decoder-only families of transformers 5.24 that cap does not train yet, and why (said in the refusal).
NOT_YET = {
    "llama4_text": "its chunked attention and input-weighted experts are not supported yet",
    "qwen3_next": "a Gated DeltaNet hybrid: its linear-attention layers are not attention layers cap can pipeline",
    "qwen3_5": "a Gated DeltaNet hybrid: its linear-attention layers are not attention layers cap can pipeline",
    "granitemoehybrid": "a Mamba-2 hybrid: its state-space layers are not attention layers cap can pipeline",
    "falcon_h1": "a Mamba-2 hybrid: its state-space layers are not attention layers cap can pipeline",
    "lfm2": "a convolution hybrid: its short-convolution layers are not attention layers cap can pipeline",
}


# Multimodal checkpoints whose text model cap trains (the vision tower and projector stay as they are): the
# config's text_config names the text family, the checkpoint holds the text model under `language_model.`
# (as the hub and save_pretrained write them) or `model.language_model.` (transformers v5's module names).
MULTIMODAL = {"gemma3": "Gemma 3 (4B–27B)", "mistral3": "Mistral Small 3.x / Ministral 3"}


def check_model_type(config: dict, where: str = "config.json") -> Family:
    """The family of a config.json's contents (a supported multimodal model's: its text model's); one line
    naming the supported model_types otherwise. Another multimodal model (its text model's config under
    text_config) is named as one."""
    model_type = config.get("model_type", "<missing>")
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    text = config.get("text_config")
    if model_type in MULTIMODAL and isinstance(text, dict) and text.get("model_type") in FAMILIES:
        return FAMILIES[text["model_type"]]
    why = f"is not supported ({NOT_YET[model_type]})" if model_type in NOT_YET else "is not supported"
    if isinstance(text, dict):
        inner = text.get("model_type", "decoder")
        why = (
            f"is a multimodal model whose text model cap does not train yet (a {inner} decoder, under text_config; "
            f"multimodal model_types cap trains: {', '.join(MULTIMODAL)})"
        )
        if inner in FAMILIES:
            why += (
                ": extract the text model into a folder of its own (its config.json = text_config, weights "
                "without the language_model prefix)"
            )
        elif inner in NOT_YET:
            why += f": {inner}: {NOT_YET[inner]}"
    raise CapError(f"{where}: model_type '{model_type}' {why}; supported model_types: {', '.join(FAMILIES)}")


def family_of(model_type: str, where: str = "config.json") -> Family:
    return check_model_type({"model_type": model_type}, where)


def load_hf_config(model_dir: Path):
    """The model's transformers config (a multimodal model's: its text model's), with the family's
    attention implementation set.

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
    if raw.get("model_type") in MULTIMODAL:
        # the text model, tied as the whole model ties its LM head (transformers reads the top-level flag)
        tied = getattr(config, "tie_word_embeddings", False)
        config = config.get_text_config()
        config.tie_word_embeddings = tied
    config._attn_implementation = family.attention
    if family.experts:
        config._experts_implementation = family.experts
    return family, config
