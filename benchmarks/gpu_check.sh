#!/usr/bin/env bash
# The CUDA checks, in one script sized for < 8 minutes on one H200 (run: make gpu-check, or on the
# device machine after `make .venv/.cap-installed`). It prints:
#   1. kernels: the Triton CE tests on CUDA, and bench_loss (fused vs unfused, peak memory and time)
#   2. cap-train on a random-init Llama-3.1-8B-shaped model (seq 4096, control adapters rank 16,
#      bf16): tokens/s, MFU = 4·N·tokens/s ÷ 989 TFLOP/s (H100/H200 dense bf16), peak memory.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
WORK=${WORK:-$(mktemp -d)}
echo "== GPU: $($PY -c 'import torch; print(torch.cuda.get_device_name(0))')"

echo "== 1. kernels on CUDA"
$PY -m pytest -q tests/test_kernels.py 2>&1 | tail -3
$PY benchmarks/bench_loss.py --seqs 2048,8192,32768 --vocabs 32000,128256 2>&1 | tail -20

echo "== 2. cap-train, Llama-3.1-8B shape, seq 4096, control adapter r=16, bf16"
$PY - "$WORK" <<'PYEOF'
import sys, json, torch, transformers
from pathlib import Path
work = Path(sys.argv[1]); model_dir = work / "llama8b"
cfg = transformers.LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
    rope_theta=500000.0, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, pad_token_id=2)
with torch.device("cuda"):
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
model.save_pretrained(model_dir, max_shard_size="5GB")
sys.path.insert(0, ".")
from tests.assets import tiny_tokenizer
tiny_tokenizer(model_dir)  # ids < 512 only; throughput does not depend on the text
data = work / "data.jsonl"
from tests.assets import sample_text
lines = sample_text(60000, seed=1)
data.write_text("".join(json.dumps({"text": " ".join(lines[i:i+40])}) + "\n" for i in range(0, len(lines), 40)))
(work / "cfg.toml").write_text(f"""model_dir = '{model_dir}'
output_dir = '{work / "out"}'
lr = 2e-5
sequence_len = 4096
lora_rank = 16
use_control_adapters = true
max_steps = 12
evals_per_run = 0
eval_fraction = 0.0
checkpoint_interval_hours = 1000
[[datasets]]
dataset_path = '{data}'
""")
print("wrote", model_dir)
PYEOF
.venv/bin/cap-train "$WORK/cfg.toml" --num-gpus 1 2>&1 | tail -5
$PY - "$WORK" <<'PYEOF'
import json, statistics, sys
from pathlib import Path
rows = [json.loads(l) for l in (Path(sys.argv[1]) / "out" / "metrics.jsonl").read_text().splitlines()]
tps = statistics.median(r["train/tokens_per_s"] for r in rows if r["step"] > 2)
n = 8.03e9
print(f"tokens/s {tps:,.0f}   MFU {4 * n * tps / 989e12:.1%} (4N FLOPs/token)   "
      f"peak {max(r['memory/peak_cuda_gib'] for r in rows):.1f} GiB")
PYEOF
