"""cap-train throughput and memory vs a plain transformers + PEFT LoRA loop, same model and settings.

    python benchmarks/bench_train.py [--model DIR] [--seq 512] [--steps 12] [--rank 16] [--dtype D]

Default model: SmolLM2-135M-Instruct (examples/demo/smollm2.py). Both sides train rank-r adapters on a
frozen base with micro batch 1, seq L, one optimizer step per sequence, no eval, no checkpoints:
- cap: `cap-train` (1 process) with control adapters, reading its own metrics.jsonl
  (tokens/s = median over steps after the first two; peak = the worker's peak RSS or CUDA peak);
- peer: AutoModelForCausalLM + peft LoRA on o_proj/down_proj (the same residual writers),
  torch.optim.AdamW, a plain fwd/bwd/step loop in a fresh subprocess (peak = its ru_maxrss).
Prints both, the ratio, and achieved FLOP/s (4·N·tokens/s: forward + activation gradients of a
frozen base) ÷ this machine's measured matmul FLOP/s in the same dtype.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def matmul_flops(dtype: torch.dtype, device: str, n: int = 2048, reps: int = 10) -> float:
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t)


def write_data(folder: Path, tokens_needed: int) -> Path:
    from tests.assets import sample_text

    lines = sample_text(max(200, tokens_needed // 8), seed=3)
    path = folder / "data.jsonl"
    with open(path, "w") as f:
        for i in range(0, len(lines), 20):
            f.write(json.dumps({"text": " ".join(lines[i : i + 20])}) + "\n")
    return path


def run_cap(model: Path, folder: Path, seq: int, steps: int, rank: int, dtype: str) -> dict:
    write_data(folder, seq * (steps + 4) * 2)
    cfg = folder / "cfg.toml"
    cfg.write_text(f"""model_dir = '{model}'
output_dir = '{folder / "out"}'
lr = 1e-4
sequence_len = {seq}
lora_rank = {rank}
use_control_adapters = true
max_steps = {steps}
evals_per_run = 0
eval_fraction = 0.0
checkpoint_interval_hours = 1000
model_dtype = '{dtype}'
[[datasets]]
dataset_path = 'data.jsonl'
""")
    t = time.time()
    subprocess.run(
        [sys.executable, "-m", "cap_train.cli", str(cfg)], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    rows = [json.loads(line) for line in (folder / "out" / "metrics.jsonl").read_text().splitlines()]
    rates = [r["train/tokens_per_s"] for r in rows if r["step"] > 2]
    peak = max(r.get("memory/peak_cuda_gib", r.get("memory/peak_rss_gib", 0)) for r in rows)
    return {"tokens_per_s": statistics.median(rates), "peak_gib": peak, "wall_s": time.time() - t}


PEER = r"""
import json, resource, statistics, sys, time, torch, transformers
from peft import LoraConfig, get_peft_model
model_dir, seq, steps, rank, dtype = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
device = "cuda" if torch.cuda.is_available() else "cpu"
model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(device)
model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank ** 0.5, target_modules=["o_proj", "down_proj"]))
for n, p in model.named_parameters():
    if p.requires_grad:
        p.data = p.data.float()
model.gradient_checkpointing_enable()  # acts only in train mode: from_pretrained returns eval mode
model.enable_input_require_grads()
model.train()
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)
ids = torch.randint(0, model.config.vocab_size, (1, seq), device=device)
rates = []
for step in range(steps):
    t = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
    if device == "cuda": torch.cuda.synchronize()
    rates.append(seq / (time.perf_counter() - t))
if device == "cuda":
    peak = torch.cuda.max_memory_allocated() / 2**30
else:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
print(json.dumps({"tokens_per_s": statistics.median(rates[2:]), "peak_gib": peak}))
"""


def run_peer(model: Path, seq: int, steps: int, rank: int, dtype: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", PEER, str(model), str(seq), str(steps), str(rank), dtype],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument(
        "--dtype",
        default=None,
        choices=["bfloat16", "float32"],
        help="default: bfloat16 on CUDA, float32 on CPU (bf16 GEMMs are ~60x slower without AVX512-BF16)",
    )
    args = ap.parse_args()
    args.dtype = args.dtype or ("bfloat16" if torch.cuda.is_available() else "float32")
    if args.model is None:
        from examples.demo.smollm2 import materialize

        args.model = materialize()
    config = json.loads((args.model / "config.json").read_text())
    import transformers

    with torch.device("meta"):
        n_params = sum(
            p.numel()
            for p in transformers.AutoModelForCausalLM.from_config(
                transformers.AutoConfig.from_pretrained(args.model)
            ).parameters()
        )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    peak_flops = matmul_flops(getattr(torch, args.dtype), device)
    with tempfile.TemporaryDirectory() as tmp:
        cap = run_cap(args.model, Path(tmp), args.seq, args.steps, args.rank, args.dtype)
    peer = run_peer(args.model, args.seq, args.steps, args.rank, args.dtype)
    print(
        f"model {config.get('model_type')} {n_params / 1e6:.0f}M params, seq {args.seq}, rank {args.rank}, "
        f"{args.dtype}, {device}, {os.cpu_count()} cores"
    )
    print(f"{'':24}{'tokens/s':>12}{'peak GiB':>12}{'FLOP/s ÷ matmul peak':>24}")
    for name, r in (("cap-train (control)", cap), ("transformers+PEFT LoRA", peer)):
        mfu = 4 * n_params * r["tokens_per_s"] / peak_flops
        print(f"{name:24}{r['tokens_per_s']:>12.1f}{r['peak_gib']:>12.2f}{mfu:>24.1%}")
    print(
        f"ratio cap/peer: tokens/s {cap['tokens_per_s'] / peer['tokens_per_s']:.2f}×, "
        f"peak memory {cap['peak_gib'] / peer['peak_gib']:.2f}×   (measured matmul peak {peak_flops / 1e9:.1f} GFLOP/s)"
    )


if __name__ == "__main__":
    main()
