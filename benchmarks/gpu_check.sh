#!/usr/bin/env bash
# The CUDA checks, in one script sized for < 8 minutes on one H200 (run: make gpu-check, or on the
# device machine after `make .venv/.cap-installed`). It prints:
#   1. kernels: the Triton CE tests on CUDA ("kernel tests: all passed", or the node id of every
#      failed test), and bench_loss (fused vs unfused, peak memory and time)
#   1b. QLoRA and a 4-bit control adapter trained by cap-train on CUDA with evals between steps,
#      against the reference trainer (tests/test_train_matrix.py::test_4bit_training_on_cuda...)
#   2. cap-train on a random-init Llama-3.1-8B-shaped model (seq 4096, control adapters rank 16,
#      bf16): tokens/s, MFU = 4·N·tokens/s ÷ 989 TFLOP/s (H100/H200 dense bf16), peak memory.
#   3. the same model with each activation_checkpointing mode at seq 4096 and 16384: tokens/s and
#      peak memory beside what `cap-train --plan` predicted, and the peer (transformers + PEFT LoRA,
#      SDPA, gradient checkpointing) at both lengths. Runs past a 7-minute budget are skipped, and said.
# A failing part is reported in a line (or its last lines) and the next part still runs; the exit
# status is non-zero if any part failed. The model, data, logs and outputs (~16 GB) go to $WORK: a
# temporary folder, removed on exit, interrupt or termination, unless the caller gave WORK=...
set -uo pipefail  # no -e: every part runs, and a failing one is added to $failed
cd "$(dirname "$0")/.." || exit 1
PY=${PY:-.venv/bin/python}
if [[ -z ${WORK:-} ]]; then
    WORK=$(mktemp -d)
    trap 'rm -rf -- "$WORK"' EXIT
fi
trap 'exit 130' INT
trap 'exit 143' TERM
failed=()
echo "== GPU: $($PY -c 'import torch; print(torch.cuda.get_device_name(0))' 2>&1 | tail -1)"

echo "== 1. kernels on CUDA"
# -rfE: a short summary line per failed or erroring test, "FAILED <node id> - <message>".
$PY -m pytest -q -rfE -p no:cacheprovider tests/test_kernels.py >"$WORK/kernels.log" 2>&1
rc=$?
ids=$(awk '/short test summary info/ {s = 1; next} s && ($1 == "FAILED" || $1 == "ERROR") {print $2}' \
    "$WORK/kernels.log")
totals=$(tail -1 "$WORK/kernels.log" | tr -d '=' | xargs)  # e.g. "12 passed, 2 skipped in 3.4s"
if ((rc == 0)); then
    echo "kernel tests: all passed ($totals)"
elif [[ -n $ids ]]; then
    failed+=("kernel tests")
    echo "kernel tests: $(wc -l <<<"$ids") failed: $(xargs <<<"$ids")  ($totals)"
else  # no per-test summary: a collection, usage or internal error
    failed+=("kernel tests")
    echo "kernel tests: pytest exited $rc; last lines:"
    tail -5 "$WORK/kernels.log"
fi
if $PY benchmarks/bench_loss.py --seqs 2048,8192,32768 --vocabs 32000,128256 >"$WORK/bench_loss.log" 2>&1; then
    tail -20 "$WORK/bench_loss.log"
else
    rc=$?
    failed+=("bench_loss")
    echo "bench_loss: FAILED (exit $rc): $(grep -v '^[[:space:]]*$' "$WORK/bench_loss.log" | tail -1)"
fi

echo "== 1b. 4-bit training on CUDA against the reference trainer (evals between steps)"
# QLoRA on q_proj/v_proj and a 4-bit control adapter, with and without evals: both must train what
# tests/reference_trainer.py trains (bf16 tolerance); an eval must change nothing.
DS_ACCELERATOR=cuda $PY -m pytest -q -rfE -p no:cacheprovider tests/test_train_matrix.py \
    -k test_4bit_training_on_cuda >"$WORK/equivalence.log" 2>&1
rc=$?
if ((rc == 0)) && grep -q " passed" "$WORK/equivalence.log" && ! grep -q "skipped" "$WORK/equivalence.log"; then
    echo "4-bit equivalence on CUDA: passed ($(tail -1 "$WORK/equivalence.log" | tr -d '=' | xargs))"
else
    failed+=("4-bit equivalence on CUDA")
    echo "4-bit equivalence on CUDA: FAILED (pytest exit $rc); last lines:"
    grep -E "^(FAILED|ERROR|E )" "$WORK/equivalence.log" | head -8
    tail -3 "$WORK/equivalence.log"
fi

echo "== 2. cap-train, Llama-3.1-8B shape, seq 4096, control adapter r=16, bf16"
rc=0
$PY - "$WORK" >"$WORK/prepare.log" 2>&1 <<'PYEOF' || rc=$?
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
if ((rc != 0)); then
    failed+=("cap-train")
    echo "cap-train: not run, writing the model and config failed (exit $rc); last lines:"
    tail -5 "$WORK/prepare.log"
elif .venv/bin/cap-train "$WORK/cfg.toml" --num-gpus 1 >"$WORK/train.log" 2>&1; then
    tail -5 "$WORK/train.log"
    $PY - "$WORK" <<'PYEOF' || failed+=("metrics")
import json, statistics, sys
from pathlib import Path
rows = [json.loads(l) for l in (Path(sys.argv[1]) / "out" / "metrics.jsonl").read_text().splitlines()]
tps = statistics.median(r["train/tokens_per_s"] for r in rows if r["step"] > 2)
n = 8.03e9
print(f"tokens/s {tps:,.0f}   MFU {4 * n * tps / 989e12:.1%} (4N FLOPs/token)   "
      f"peak {max(r['memory/peak_cuda_gib'] for r in rows):.1f} GiB")
PYEOF
else
    rc=$?
    failed+=("cap-train")
    echo "cap-train: FAILED (exit $rc); last lines:"
    tail -15 "$WORK/train.log"
fi

echo "== 3. activation_checkpointing modes (and compile_layers) on the 8B shape (6 steps each), the plan beside them, and the peer"
if [[ -f $WORK/cfg.toml ]]; then
    $PY - "$WORK" <<'PYEOF' || failed+=("checkpointing modes")
import json, statistics, subprocess, sys, time
from pathlib import Path
sys.path.insert(0, ".")
from cap_common.config import load_config
from cap_train.plan import GIB, make_plan
work = Path(sys.argv[1]); base = (work / "cfg.toml").read_text()
deadline = time.time() + 420  # keep the whole script near its budget: later runs are skipped, and said so
bad = 0
MODES = ("false", "true", "'selective'", "'offload'")
# (seq, mode, compile_layers): every mode at both lengths, and compiled layers at 4096 beside them
RUNS = [(4096, m, False) for m in MODES] + [(4096, "true", True), (4096, "false", True)]
RUNS += [(16384, m, False) for m in MODES]
for seq, mode, compiled in RUNS:
    name = mode.strip(chr(39)) + ("-compiled" if compiled else "")
    label = f"{mode}{' compiled' if compiled else ''}"
    if time.time() > deadline:
        print(f"seq {seq:>5} {label:<16} skipped (time budget)"); continue
    out = work / f"out-{seq}-{name}"
    cfg = work / f"cfg-{seq}-{name}.toml"
    text = base.replace("sequence_len = 4096", f"sequence_len = {seq}").replace("max_steps = 12", "max_steps = 6")
    text = text.replace(f"output_dir = '{work / 'out'}'", f"output_dir = '{out}'\nprepared_dir = '{work / 'prepared'}'")
    keys = f"activation_checkpointing = {mode}\ncompile_layers = {str(compiled).lower()}\n"
    cfg.write_text(text.replace("[[datasets]]", keys + "[[datasets]]"))
    plan = max(make_plan(load_config(str(cfg)), 1, "cuda").peaks()) / GIB
    run = subprocess.run([".venv/bin/cap-train", str(cfg), "--num-gpus", "1"], capture_output=True, text=True)
    if run.returncode:
        last = (run.stderr.strip().splitlines() or ["?"])[-1][:160]
        print(f"seq {seq:>5} {label:<16} FAILED: {last}   (plan {plan:.1f} GiB)"); bad += 1; continue
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    tps = statistics.median(r["train/tokens_per_s"] for r in rows if r["step"] > 2)
    peak = max(r.get("memory/peak_cuda_gib", r.get("memory/peak_rss_gib", 0)) for r in rows)
    print(f"seq {seq:>5} {label:<16} tokens/s {tps:>8,.0f}   peak {peak:5.1f} GiB   plan {plan:5.1f} GiB")
peer = r"""
import json, statistics, sys, time, torch, transformers
from peft import LoraConfig, get_peft_model
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16, attn_implementation="sdpa").cuda()
model = get_peft_model(model, LoraConfig(r=16, target_modules=["o_proj", "down_proj"]))
model.gradient_checkpointing_enable(); model.enable_input_require_grads(); model.train()
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
for seq in (4096, 16384):
    torch.cuda.reset_peak_memory_stats(); ids = torch.randint(0, 500, (1, seq), device="cuda"); rates = []
    for _ in range(5):
        t = time.perf_counter(); model(input_ids=ids, labels=ids).loss.backward(); opt.step(); opt.zero_grad()
        torch.cuda.synchronize(); rates.append(seq / (time.perf_counter() - t))
    print(f"peer (transformers+PEFT, SDPA, gradient checkpointing) seq {seq:>5} tokens/s {statistics.median(rates[2:]):>8,.0f}"
          f"   peak {torch.cuda.max_memory_allocated() / 2**30:5.1f} GiB")
"""
if time.time() < deadline + 120:
    run = subprocess.run([sys.executable, "-c", peer, str(work / "llama8b")], capture_output=True, text=True)
    print(run.stdout.strip() or f"peer FAILED: {(run.stderr.strip().splitlines() or ['?'])[-1][:160]}")
sys.exit(1 if bad else 0)
PYEOF
fi

if ((${#failed[@]})); then
    printf -v list '%s, ' "${failed[@]}"
    echo "== FAILED: ${list%, }"
    exit 1
fi
echo "== all checks passed"
