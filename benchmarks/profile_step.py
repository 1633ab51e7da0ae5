"""Where a training step's time goes, cap's layers against the transformers + PEFT model, in one process.

    python benchmarks/profile_step.py [--model DIR] [--seq 512] [--dtype float32] [--steps 4]

Both sides: SmolLM2 (default), one sequence of --seq tokens, frozen base, rank-16 adapters on the
residual writers (cap: control adapters, 'writers'; peer: PEFT LoRA on o_proj/down_proj), forward
+ backward, no optimizer. cap's side is its pipeline layers run in order (embedding, decoder layers,
fused LM head + loss), without DeepSpeed's engine; the engine's own cost per step is what
bench_train.py measures beyond this. torch.profiler's self CPU time is summed per category of op:
matmul (mm/addmm/bmm/linear), attention (SDPA kernels), loss (cross entropy, log-softmax, the fused
loss's chunks), elementwise (everything else). Prints ms per step and the share of each category.
"""

from __future__ import annotations

import argparse
import statistics
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

    def step():
        x = (ids, classes)
        for layer in layers:
            x = layer(x)
        x.backward()

    return step


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

    def step():
        model(input_ids=ids, labels=ids).loss.backward()

    return step


def measure(step, steps: int) -> tuple[float, dict[str, float]]:
    step()  # warm-up
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    shares: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        shares[category(event.key)] += event.self_cpu_time_total
    total = sum(shares.values())
    return statistics.median(times), {k: v / total for k, v in shares.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--modes", default="false,true", help="checkpointing: false, true, selective (cap only)")
    args = ap.parse_args()
    if args.model is None:
        from examples.demo.smollm2 import materialize

        args.model = materialize()
    print(f"{args.model.name}, seq {args.seq}, {args.dtype}, {torch.get_num_threads()} threads")
    for raw in args.modes.split(","):
        mode = {"false": False, "true": True}.get(raw, raw)
        sides = [("cap", cap_step)] + ([("peer", peer_step)] if raw in ("false", "true") else [])
        for name, make in sides:
            seconds, shares = measure(make(args.model, args.seq, args.dtype, mode), args.steps)
            parts = ", ".join(f"{k} {v:.0%}" for k, v in sorted(shares.items(), key=lambda kv: -kv[1]))
            print(f"checkpointing {raw:<9} {name:<5} {seconds * 1000:7.0f} ms/step   {parts}")


if __name__ == "__main__":
    main()
