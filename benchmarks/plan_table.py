"""The README's "will it fit" table: `cap-train --plan` for published model shapes on 24, 48 and 80 GiB
GPUs. Each model is only its config.json (the published numbers below, written to a temp folder);
nothing is downloaded and no weight exists. Setting: LoRA r=16 on every linear, seq 4096, micro batch 1,
gradient accumulation 8, activation checkpointing on, bf16 base (or nf4 with load_in_4bit).

    python benchmarks/plan_table.py            # prints the Markdown table
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cap_common.config import load_config  # noqa: E402
from cap_train.plan import GIB, make_plan, smallest_fit  # noqa: E402

LLAMA = dict(
    model_type="llama",
    architectures=["LlamaForCausalLM"],
    hidden_act="silu",
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    max_position_embeddings=131072,
    vocab_size=128256,
    tie_word_embeddings=False,
    bos_token_id=128000,
    eos_token_id=128001,
    torch_dtype="bfloat16",
)
MODELS = {
    "Llama-3.1-8B": {
        **LLAMA,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
    },
    "Llama-3.1-70B": {
        **LLAMA,
        "hidden_size": 8192,
        "intermediate_size": 28672,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
    },
    "Mixtral-8x7B": {
        "model_type": "mixtral",
        "architectures": ["MixtralForCausalLM"],
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "vocab_size": 32000,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1e6,
        "max_position_embeddings": 32768,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    },
}
SETTING = """model_dir = '{model}'
output_dir = '{out}'
lora_rank = 16
lr = 1e-4
sequence_len = 4096
micro_batch_size = 1
gradient_accumulation_steps = 8
model_dtype = 'bfloat16'
activation_checkpointing = true
load_in_4bit = {four_bit}
pipeline_stages = {stages}
[[datasets]]
dataset_path = 'data.jsonl'
"""


def config(root: Path, name: str, four_bit: bool, stages: int):
    model = root / name
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text(json.dumps(MODELS[name]))
    (root / "data.jsonl").write_text('{"text": "x"}\n')
    path = root / f"{name}-{four_bit}-{stages}.toml"
    path.write_text(SETTING.format(model=model, out=root / "out", four_bit=str(four_bit).lower(), stages=stages))
    return load_config(str(path))


def main() -> None:
    cards = (24, 48, 80)
    print("| model | base | " + " | ".join(f"{c} GiB GPUs" for c in cards) + " |")
    print("|---|---|" + "---|" * len(cards))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name in MODELS:
            for four_bit in (False, True):
                cells = []
                for card in cards:
                    t0 = time.perf_counter()
                    fit = smallest_fit(config(root, name, four_bit, 1), card * GIB, (four_bit,))
                    if fit is None:
                        cells.append("does not fit")
                        continue
                    stages, _ = fit
                    plan = make_plan(config(root, name, four_bit, stages), stages, "cuda")
                    cells.append(f"{stages} stage(s), {max(plan.peaks()) / GIB:.1f} GiB peak")
                    print(f"  ({name} {card} GiB: {time.perf_counter() - t0:.1f} s)", file=sys.stderr)
                print(f"| {name} | {'nf4' if four_bit else 'bf16'} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
