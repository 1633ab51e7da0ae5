"""Offline test assets: a tiny byte-level BPE tokenizer and tiny random models of every family.

Nothing is downloaded. `tiny_model(family, folder)` writes a Hugging Face model folder
(config.json, model.safetensors, tokenizer files) with random weights; the pytest fixtures in
conftest.py build each once per test session.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
VOCAB_SIZE = 512

FAMILIES = ("llama", "mistral", "mixtral", "qwen2", "qwen3", "cohere", "cohere2", "gemma2")

# DeepSeek's MoE layers (GLM-4.5's too): a dense first layer, routed + shared experts, grouped top-k.
_DEEPSEEK_MOE = {
    "moe_intermediate_size": 32,
    "n_routed_experts": 8,
    "n_shared_experts": 1,
    "num_experts_per_tok": 2,
    "n_group": 2,
    "topk_group": 1,
    "first_k_dense_replace": 1,
    "routed_scaling_factor": 2.5,
    "norm_topk_prob": True,
}
# Yarn rotary scaling from a 32-token original context (DeepSeek-V3, GPT-OSS)
_YARN = {
    "rope_type": "yarn",
    "rope_theta": 1e4,
    "factor": 4.0,
    "original_max_position_embeddings": 32,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
}
# What differs per family in the tiny configs; everything else is in _common_config().
_FAMILY_CONFIG = {
    "llama": (transformers.LlamaConfig, {}),
    "mistral": (transformers.MistralConfig, {"sliding_window": 8}),
    "mixtral": (transformers.MixtralConfig, {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": None}),
    "qwen2": (transformers.Qwen2Config, {}),
    "qwen3": (transformers.Qwen3Config, {"head_dim": 16}),
    "cohere": (transformers.CohereConfig, {"logit_scale": 0.5, "tie_word_embeddings": True}),
    "cohere2": (
        transformers.Cohere2Config,
        {
            "logit_scale": 0.5,
            "sliding_window": 8,
            "tie_word_embeddings": True,
            "layer_types": ["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
        },
    ),
    "gemma2": (
        transformers.Gemma2Config,
        {
            "head_dim": 16,
            "sliding_window": 8,
            "final_logit_softcapping": 30.0,
            "attn_logit_softcapping": 50.0,
            "query_pre_attn_scalar": 16,
            "layer_types": ["sliding_attention", "full_attention"] * 2,
        },
    ),
    # Not in FAMILIES (the full test matrix); built on demand by the tests that cover every family cap knows,
    # each with every feature of the family switched on.
    "phi3": (transformers.Phi3Config, {"sliding_window": 8}),
    # local/global layers with their own rotary (linear-scaled global), QK-norm, sandwich norms, √H, softcap
    "gemma3_text": (
        transformers.Gemma3TextConfig,
        {
            "head_dim": 16,
            "query_pre_attn_scalar": 16,
            "sliding_window": 8,
            "layer_types": ["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
            "final_logit_softcapping": 30.0,
            "rope_parameters": {
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
            },
            "tie_word_embeddings": True,
        },
    ),
    # a dense layer (mlp_only_layers) among MoE layers, normalized top-k, sliding window, QK-norm
    "qwen3_moe": (
        transformers.Qwen3MoeConfig,
        {
            "head_dim": 16,
            "moe_intermediate_size": 32,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [1],
            "norm_topk_prob": True,
            "use_sliding_window": True,
            "sliding_window": 8,
        },
    ),
    # a dense first layer, routed + shared experts, sigmoid router with grouped top-k, QK-norm, partial rotary
    "glm4_moe": (
        transformers.Glm4MoeConfig,
        {
            "head_dim": 16,
            **_DEEPSEEK_MOE,
            "use_qk_norm": True,
            "attention_bias": True,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5},
        },
    ),
    # + multi-head latent attention (q and kv low-rank with their norms, rope/nope split, yarn)
    "deepseek_v3": (
        transformers.DeepseekV3Config,
        {
            "num_key_value_heads": 4,
            **_DEEPSEEK_MOE,
            "q_lora_rank": 32,
            "kv_lora_rank": 16,
            "qk_rope_head_dim": 8,
            "qk_nope_head_dim": 8,
            "v_head_dim": 16,
            "rope_interleave": True,
            "rope_parameters": {**_YARN, "mscale": 1.0, "mscale_all_dim": 1.0},
        },
    ),
    # partial (interleaved) rotary, q/k/v biases, fused gate_up_proj, post-norms
    "glm4": (
        transformers.Glm4Config,
        {
            "head_dim": 16,
            "attention_bias": True,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5},
        },
    ),
    # norms after attention and MLP only, QK-norm over the whole projection
    "olmo2": (transformers.Olmo2Config, {}),
    # + sliding layers, and a rotary per layer type (yarn on the full-attention layers)
    "olmo3": (
        transformers.Olmo3Config,
        {
            "sliding_window": 8,
            "layer_types": ["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
            "rope_parameters": {
                "full_attention": {
                    "rope_type": "yarn",
                    "rope_theta": 5e5,
                    "factor": 4.0,
                    "original_max_position_embeddings": 32,
                    "attention_factor": 1.2,
                    "beta_fast": 32.0,
                    "beta_slow": 1.0,
                },
                "sliding_attention": {"rope_type": "default", "rope_theta": 5e5},
            },
        },
    ),
    # NoPE on every second layer (those slide), tied embeddings
    "smollm3": (
        transformers.SmolLM3Config,
        {"no_rope_layer_interval": 2, "use_sliding_window": True, "sliding_window": 8, "tie_word_embeddings": True},
    ),
    # yarn with the position-dependent query scale (llama_4_scaling_beta) within the test's length
    "ministral3": (
        transformers.Ministral3Config,
        {
            "head_dim": 16,
            "sliding_window": 8,
            "rope_parameters": {
                "rope_type": "yarn",
                "rope_theta": 1e6,
                "factor": 16.0,
                "original_max_position_embeddings": 8,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "mscale_all_dim": 1.0,
                "mscale": 1.0,
                "llama_4_scaling_beta": 0.1,
            },
        },
    ),
    # embedding, residual, attention and logit multipliers
    "granite": (
        transformers.GraniteConfig,
        {
            "embedding_multiplier": 4.0,
            "logits_scaling": 0.5,
            "residual_multiplier": 0.5,
            "attention_multiplier": 0.0625,
            "tie_word_embeddings": True,
        },
    ),
    "granitemoe": (
        transformers.GraniteMoeConfig,
        {
            "intermediate_size": 32,
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            "embedding_multiplier": 4.0,
            "logits_scaling": 0.5,
            "residual_multiplier": 0.5,
            "attention_multiplier": 0.0625,
        },
    ),
    # attention sinks, alternating sliding layers, biased q/k/v/o, experts with biases in a transposed,
    # interleaved gate/up layout and a clamped SwiGLU, a biased softmax top-k router, yarn
    "gpt_oss": (
        transformers.GptOssConfig,
        {
            "head_dim": 16,
            "intermediate_size": 32,
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            "sliding_window": 8,
            "layer_types": ["sliding_attention", "full_attention"] * 2,
            "swiglu_limit": 0.5,
            "rope_parameters": {**_YARN, "truncate": False},
        },
    ),
}
# The families released since 2025 (and Phi-3), held to transformers by tests/test_models.py.
MORE_FAMILIES = tuple(name for name in _FAMILY_CONFIG if name not in FAMILIES)


def sample_text(n_lines: int = 400, seed: int = 0) -> list[str]:
    """Deterministic English-like lines, for training the tokenizer and for test datasets."""
    g = torch.Generator().manual_seed(seed)
    words = (
        "the a control adapter model token layer learns style tone of and to in is with "
        "quick brown fox jumps over lazy dog sea wind light river stone bright dark "
        "small large red blue green yellow always never maybe because then while"
    ).split()
    lines = []
    for _ in range(n_lines):
        n = int(torch.randint(3, 16, (1,), generator=g))
        idx = torch.randint(0, len(words), (n,), generator=g).tolist()
        lines.append(" ".join(words[i] for i in idx).capitalize() + ".")
    return lines


def tiny_tokenizer(folder: Path | None = None) -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE (VOCAB_SIZE tokens) trained offline, with bos/eos/pad; saved to `folder` if given."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from tokenizers.processors import TemplateProcessing

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(sample_text(2000, seed=1), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD)
    if folder is not None:
        fast.save_pretrained(folder)
    return fast


def _common_config(tokenizer) -> dict:
    return dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )


def tiny_config(family: str, tokenizer, **overrides) -> transformers.PretrainedConfig:
    cls, extra = _FAMILY_CONFIG[family]
    return cls(**{**_common_config(tokenizer), **extra, **overrides})


def tiny_model(family: str, folder: Path, seed: int = 0, dtype=torch.float32, **overrides) -> Path:
    """Write a random tiny `family` model (and the tiny tokenizer) to `folder`; returns the folder."""
    folder = Path(folder)
    tokenizer = tiny_tokenizer(folder)
    config = tiny_config(family, tokenizer, **overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    # Random init leaves norm weights at exactly 1 (Gemma/Cohere at 0) and biases at 0; perturb them so
    # that tests catch a norm that is skipped or applied twice, or a bias left out (e.g. of a writer).
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    return folder


# ---------------------------------------------------------------- chat templates
# Three families' chat formats, written here as compact Jinja templates that render what the families' own
# templates render for plain system/user/assistant conversations: (template, bos, eos, pad, added specials).
CHAT_FAMILIES = {
    "llama3": (
        "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + "
        "m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}",
        "<|begin_of_text|>",
        "<|end_of_text|>",
        None,
        ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    ),
    "chatml": (
        "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
        "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
        "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
        None,
        "<|im_end|>",
        "<|endoftext|>",
        ["<|im_start|>"],
    ),
    "gemma": (
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set first = messages[0]['content'] | trim + "
        "'\\n\\n' %}{% set turns = messages[1:] %}{% else %}{% set first = '' %}{% set turns = messages %}{% endif %}"
        "{% for m in turns %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
        "{{ '<start_of_turn>' + role + '\\n' + (first if loop.first else '') + m['content'] | trim + "
        "'<end_of_turn>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}",
        "<bos>",
        "<eos>",
        "<pad>",
        ["<start_of_turn>", "<end_of_turn>"],
    ),
}


def chat_tokenizer(family: str, folder: Path) -> Path:
    """A tiny tokenizer with `family`'s special tokens and chat template, saved to `folder`: byte-level BPE,
    except gemma's, a SentencePiece-style BPE (Metaspace pre-tokenizer, '▁' for spaces) as Gemma's is."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    template, bos, eos, pad, extra = CHAT_FAMILIES[family]
    specials = [t for t in (bos, eos, pad) if t] + extra
    if family == "gemma":
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        alphabet = [chr(c) for c in range(32, 127)] + list("\n\t▁éü—😀")
        specials = ["<unk>"] + specials
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=specials, initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(sample_text(2000, seed=1), trainer=trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        unk_token="<unk>" if family == "gemma" else None,
        additional_special_tokens=extra,
    )
    fast.chat_template = template
    fast.save_pretrained(folder)
    return Path(folder)
