"""cap-train throughput and memory against a plain transformers + PEFT LoRA loop, run so that the
figure holds on any machine: the two sides interleaved, several times, medians and spread.

    python benchmarks/bench_train.py [--model DIR] [--seq 512] [--steps 12] [--rank 16]
        [--dtypes float32,bfloat16] [--modes true,false,selective,offload] [--repeats 3] [--two-process]
        [--compile]

Default model: SmolLM2-135M-Instruct (examples/models.py). Both sides train rank-r adapters on a
frozen base, micro batch 1, seq L, one optimizer step per sequence, no eval, no checkpoints:
- cap: `cap-train` with control adapters on the residual writers, activation_checkpointing = MODE
  (and compile_layers = true with --compile),
  reading its own metrics.jsonl (tokens/s = median over the steps after the first two; peak = the
  worker's peak RSS, or CUDA allocator peak);
- peer: AutoModelForCausalLM (SDPA) + PEFT LoRA on o_proj/down_proj (the same residual writers),
  torch.optim.AdamW, a plain fwd/bwd/step loop in a fresh process, with gradient checkpointing when
  cap's mode recomputes whole layers (true, offload, N) and without it otherwise (false, selective:
  transformers has no selective mode).
With --two-process, cap also runs with gradient_accumulation_steps = 4 on 1 process and on
2 processes × 2 pipeline stages (the same global batch; the 1F1B bubble is 1/5), and the scaling
is printed.
Prints the CPU's model and whether it has AVX512-BF16 / AMX (bf16 matmuls 25-60× slower without),
then per dtype and mode: median (min-max) tokens/s and peak memory of each side, and the ratios.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def cpu_description() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown CPU"
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    has = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{model}, {os.cpu_count()} cores, flags: {' '.join(has) or 'none of avx2/avx512'}"


def write_data(folder: Path, tokens_needed: int) -> Path:
    from tests.assets import sample_text

    lines = sample_text(max(200, tokens_needed // 8), seed=3)
    path = folder / "data.jsonl"
    with open(path, "w") as f:
        for i in range(0, len(lines), 20):
            f.write(json.dumps({"text": " ".join(lines[i : i + 20])}) + "\n")
    return path


def toml_value(mode: str) -> str:
    return mode if mode in ("true", "false") or mode.isdigit() else f"'{mode}'"


def run_cap(model: Path, folder: Path, args, dtype: str, mode: str, procs: int = 1, accumulation: int = 1) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    steps = max(4, args.steps // accumulation)
    write_data(folder, args.seq * (steps + 4) * accumulation * 2)
    cfg = folder / "cfg.toml"
    cfg.write_text(f"""model_dir = '{model}'
output_dir = '{folder / "out"}'
prepared_dir = '{folder.parent / "prepared"}'
lr = 1e-4
sequence_len = {args.seq}
lora_rank = {args.rank}
use_control_adapters = true
control_adapter_target = 'writers'
max_steps = {steps}
gradient_accumulation_steps = {accumulation}
evals_per_run = 0
eval_fraction = 0.0
checkpoint_interval_hours = 1000
model_dtype = '{dtype}'
activation_checkpointing = {toml_value(mode)}
compile_layers = {str(args.compile).lower()}
pipeline_stages = {procs}
[[datasets]]
dataset_path = 'data.jsonl'
""")
    subprocess.run(
        [sys.executable, "-m", "cap_train.cli", str(cfg), "--num-gpus", str(procs)],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    rows = [json.loads(line) for line in (folder / "out" / "metrics.jsonl").read_text().splitlines()]
    rates = [r["train/tokens_per_s"] for r in rows if r["step"] > 2]
    peak = max(r.get("memory/peak_cuda_gib", r.get("memory/peak_rss_gib", 0)) for r in rows)
    return {"tokens_per_s": statistics.median(rates), "peak_gib": peak}


PEER = r"""
import json, resource, statistics, sys, time, torch, transformers
from peft import LoraConfig, get_peft_model
model_dir, seq, steps, rank, dtype, recompute = sys.argv[1:7]
seq, steps, rank = int(seq), int(steps), int(rank)
device = "cuda" if torch.cuda.is_available() else "cpu"
model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype),
                                                          attn_implementation="sdpa").to(device)
model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank ** 0.5, target_modules=["o_proj", "down_proj"]))
for n, p in model.named_parameters():
    if p.requires_grad:
        p.data = p.data.float()
if recompute == "1":
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


def run_peer(model: Path, args, dtype: str, mode: str) -> dict:
    recompute = "0" if mode in ("false", "selective") else "1"
    out = subprocess.run(
        [sys.executable, "-c", PEER, str(model), str(args.seq), str(args.steps), str(args.rank), dtype, recompute],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def summary(runs: list[dict], key: str) -> tuple[float, str]:
    values = [r[key] for r in runs]
    return statistics.median(values), f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--modes", default="true,false,selective", help="cap's activation_checkpointing values")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--two-process", action="store_true", help="also cap on 2 processes × 2 stages")
    ap.add_argument("--compile", action="store_true", help="cap with compile_layers = true")
    args = ap.parse_args()
    if args.model is None:
        from examples import models

        args.model = models.smollm2()
    print(
        f"{cpu_description()}; model {args.model.name}, seq {args.seq}, rank {args.rank}, {args.steps} steps"
        + ("; cap with compile_layers = true" if args.compile else "")
    )
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in args.dtypes.split(","):
            for mode in args.modes.split(","):
                sides = {"cap": [], "peer": [], "cap 1×1, accumulation 4": [], "cap 2×2, accumulation 4": []}
                for rep in range(args.repeats):  # interleaved: a slow minute hits both sides alike
                    t0 = time.time()
                    sides["cap"].append(run_cap(args.model, Path(tmp) / f"{dtype}-{mode}-{rep}", args, dtype, mode))
                    sides["peer"].append(run_peer(args.model, args, dtype, mode))
                    if args.two_process:  # the same global batch of 4 sequences, 1 process vs 2 stages
                        for procs in (1, 2):
                            folder = Path(tmp) / f"{dtype}-{mode}-{rep}-{procs}p"
                            run = run_cap(args.model, folder, args, dtype, mode, procs=procs, accumulation=4)
                            sides[f"cap {procs}×{procs}, accumulation 4"].append(run)
                    print(f"  {dtype} {mode} repeat {rep + 1}: {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
                report(dtype, mode, sides)


def report(dtype: str, mode: str, sides: dict) -> None:
    cap_tps, cap_tps_s = summary(sides["cap"], "tokens_per_s")
    peer_tps, peer_tps_s = summary(sides["peer"], "tokens_per_s")
    cap_mem, cap_mem_s = summary(sides["cap"], "peak_gib")
    peer_mem, peer_mem_s = summary(sides["peer"], "peak_gib")
    peer_ckpt = "no checkpointing" if mode in ("false", "selective") else "gradient checkpointing"
    print(f"\n{dtype}, activation_checkpointing = {mode} (peer: {peer_ckpt}); median (min-max) of {len(sides['cap'])}")
    print(f"  cap   tokens/s {cap_tps_s:>22}   peak GiB {cap_mem_s}")
    print(f"  peer  tokens/s {peer_tps_s:>22}   peak GiB {peer_mem_s}")
    print(f"  cap/peer: {cap_tps / peer_tps:.2f}× tokens/s at {cap_mem / peer_mem:.2f}× peak memory")
    if sides["cap 2×2, accumulation 4"]:
        one, one_s = summary(sides["cap 1×1, accumulation 4"], "tokens_per_s")
        two, two_s = summary(sides["cap 2×2, accumulation 4"], "tokens_per_s")
        print(f"  accumulation 4: 1 process tokens/s {one_s}; 2 processes × 2 stages {two_s} = {two / one:.2f}×")


if __name__ == "__main__":
    main()
