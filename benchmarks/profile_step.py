"""Where a training step's time goes, cap's layers against the transformers + PEFT model, in one process.

    python benchmarks/profile_step.py [--model DIR] [--seq 512] [--dtype float32] [--steps 5]
        [--modes false,true,selective]

Both sides: SmolLM2 (default), one sequence of --seq tokens, frozen base, rank-16 adapters on the
residual writers (cap: control adapters, 'writers'; peer: PEFT LoRA on o_proj/down_proj), forward
+ backward, no optimizer. cap's side is its pipeline layers run in order (embedding, decoder layers,
fused LM head + loss), without DeepSpeed's engine; the engine's own cost per step is what
bench_train.py measures beyond this. torch.profiler's self CPU time is summed per category of op:
matmul (mm/addmm/bmm/linear), attention (SDPA kernels), loss (cross entropy, log-softmax, the fused
loss's chunks), elementwise (everything else). Prints the median ms per step (the sides interleaved),
the share of each category, and the memory the forward leaves held for the backward (measured in a
fresh process: resident memory after the forward minus before, large allocations mmapped).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CATEGORIES = {
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::linear", "aten::matmul"),
    "attention": ("scaled_dot_product", "flash_attention"),
    "loss": ("cross_entropy", "log_softmax", "nll_loss", "logsumexp", "ce_rows"),
}


def category(name: str) -> str:
    for cat, keys in CATEGORIES.items():
        if any(k in name for k in keys):
            return cat
    return "elementwise and other"


def cap_step(model_dir: Path, seq: int, dtype: str, mode):
    from cap_common.config import config_from_dict
    from cap_common.models.pipeline import build_pipeline_layers
    from cap_common.models.spec import ModelSpec
    from cap_train.loss import PipelineLoss

    cfg = config_from_dict(
        dict(
            model_dir=str(model_dir),
            output_dir="/tmp/unused",
            lr=1e-4,
            sequence_len=seq,
            lora_rank=16,
            use_control_adapters=True,
            control_adapter_target="writers",
            model_dtype=dtype,
            activation_checkpointing=mode,
            datasets=[{"dataset_path": "x"}],
        ),
        ROOT / "cfg.toml",
    )
    layers = build_pipeline_layers(ModelSpec.from_config(cfg), loss_fn=PipelineLoss())
    ids = torch.randint(3, 1000, (1, seq))
    classes = torch.ones(1, seq, dtype=torch.int8)

    def forward():
        x = (ids, classes)
        for layer in layers:
            x = layer(x)
        return x

    return forward


def peer_step(model_dir: Path, seq: int, dtype: str, mode):
    import transformers
    from peft import LoraConfig, get_peft_model

    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=getattr(torch, dtype), attn_implementation="sdpa"
    )
    model = get_peft_model(model, LoraConfig(r=16, target_modules=["o_proj", "down_proj"]))
    if mode is True:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    model.train()
    ids = torch.randint(3, 1000, (1, seq))

    def forward():
        return model(input_ids=ids, labels=ids).loss

    return forward


def resident_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def held_for_backward(forward) -> int:
    """Bytes the forward leaves allocated for the backward (what activation checkpointing trims):
    resident memory after the forward minus before it, in a process whose large allocations are
    mmapped (MALLOC_MMAP_THRESHOLD_), so that freed tensors leave the resident set at once."""
    forward().backward()  # warm-up: lazily built buffers and caches stay out of the difference
    before = resident_bytes()
    loss = forward()
    held = resident_bytes() - before
    loss.backward()
    return held


def profile_shares(forward) -> dict[str, float]:
    """Each category's share of one step's self CPU time."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        forward().backward()
    shares: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        shares[category(event.key)] += event.self_cpu_time_total
    total = sum(shares.values())
    return {k: v / total for k, v in shares.items()}


def held_in_fresh_process(args, side: str, raw: str) -> int:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [sys.executable, __file__, "--model", str(args.model), "--seq", str(args.seq), "--dtype", args.dtype]
    out = subprocess.run(cmd + ["--held", side, raw], env=env, check=True, capture_output=True, text=True)
    return int(out.stdout.split()[-1])


SIDES = {"cap": cap_step, "peer": peer_step}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per side, interleaved")
    ap.add_argument("--modes", default="false,true,selective", help="checkpointing: false, true, selective (cap only)")
    ap.add_argument("--held", nargs=2, metavar=("SIDE", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.model is None:
        from examples import models

        args.model = models.smollm2()
    if args.held:
        side, raw = args.held
        print(held_for_backward(SIDES[side](args.model, args.seq, args.dtype, MODES.get(raw, raw))))
        return
    print(f"{args.model.name}, seq {args.seq}, {args.dtype}, {torch.get_num_threads()} threads")
    for raw in args.modes.split(","):
        names = ["cap"] + (["peer"] if raw in ("false", "true") else [])
        forwards = {name: SIDES[name](args.model, args.seq, args.dtype, MODES.get(raw, raw)) for name in names}
        times = defaultdict(list)
        for name in names:
            forwards[name]().backward()  # warm-up
        for _ in range(args.steps):  # interleaved, so that a slow moment hits both sides
            for name in names:
                t = time.perf_counter()
                forwards[name]().backward()
                times[name].append(time.perf_counter() - t)
        for name in names:
            shares = profile_shares(forwards[name])
            held = held_in_fresh_process(args, name, raw) / 2**20
            parts = ", ".join(f"{k} {v:.0%}" for k, v in sorted(shares.items(), key=lambda kv: -kv[1]))
            ms = statistics.median(times[name]) * 1000
            print(f"checkpointing {raw:<9} {name:<5} {ms:7.0f} ms/step  held for backward {held:7.0f} MiB   {parts}")
        del forwards


MODES = {"false": False, "true": True}

if __name__ == "__main__":
    main()
