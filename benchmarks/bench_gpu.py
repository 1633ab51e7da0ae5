"""cap-train against the loop users would otherwise write (transformers + PEFT, SDPA, torch AdamW),
side by side on one GPU: tokens/s, peak memory and where the time goes, for each setting of
issue 22's table. Prints the table and writes it as JSON.

    python -m benchmarks.bench_gpu --work DIR [--shape 8b|tiny] [--rows NAME,...] [--budget-s 330]
        [--json FILE] [--warmup 2] [--steps 3]

--shape 8b: a random-init Llama-3.1-8B-shaped model (bf16, written once to DIR/model); tiny: the
tests' tiny Llama (float32, on CPU too: a check of this script, not a benchmark). Each cap row is
one `cap-train --num-gpus 1` run of warmup + steps + 1 optimizer steps: tokens/s is the median of
the `steps` timed steps, the last step is profiled (CAP_PROFILE, cap_train/profile.py) and kept out
of the timing. The peer runs in one process per kind (LoRA on a bf16 model; QLoRA on
BitsAndBytesConfig nf4 with double quantization, as cap's nf4), the model loaded once, the same
warm-up, timed and profiled steps, profiled by the same `summarize`. Peak memory is
torch.cuda.max_memory_allocated on both sides (on CPU: peak resident memory). Rows run in the order
below, most important first; once --budget-s has passed, the rest are listed as skipped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LORA = dict(lora_rank=16, target_modules=["o_proj", "down_proj"])
QLORA = dict(lora_rank=16, load_in_4bit=True)  # every linear (cap's default targets)
CONTROL = dict(lora_rank=16, use_control_adapters=True)


@dataclasses.dataclass(frozen=True)
class Row:
    name: str  # <adapter>-<activation checkpointing>[-16k][-compiled]; "none": no recompute
    cap: dict  # cap-train config keys
    peer: tuple[str, bool] | None  # (kind "lora" | "qlora", gradient checkpointing); None: cap alone
    seq: int = 4096


ROWS = [  # most important first: issue 22's targets, then the rest of its table, then candidates
    Row("lora-recompute", {**LORA, "activation_checkpointing": True}, ("lora", True)),
    Row("qlora-recompute", {**QLORA, "activation_checkpointing": True}, ("qlora", True)),
    Row("control-none", {**CONTROL, "activation_checkpointing": False}, ("lora", False)),
    Row("control-none-16k", {**CONTROL, "activation_checkpointing": False}, ("lora", False), 16384),
    Row("lora-none", {**LORA, "activation_checkpointing": False}, ("lora", False)),
    Row("qlora-none", {**QLORA, "activation_checkpointing": False}, ("qlora", False)),
    Row("control-recompute", {**CONTROL, "activation_checkpointing": True}, ("lora", True)),
    Row("control-recompute-16k", {**CONTROL, "activation_checkpointing": True}, ("lora", True), 16384),
    Row("control-selective", {**CONTROL, "activation_checkpointing": "selective"}, None),
    Row("control-offload", {**CONTROL, "activation_checkpointing": "offload"}, None),
    Row("control-none-compiled", {**CONTROL, "activation_checkpointing": False, "compile_layers": True}, None),
    Row("lora-recompute-compiled", {**LORA, "activation_checkpointing": True, "compile_layers": True}, None),
]


# ---------------------------------------------------------------- the model and data
def write_model(work: Path, shape: str) -> Path:
    """DIR/model-<shape> and DIR/data.jsonl, written once (kept between runs with the same --work)."""
    import torch
    import transformers

    from tests.assets import sample_text, tiny_model, tiny_tokenizer

    folder = work / f"model-{shape}"
    if not (folder / "config.json").exists():
        if shape == "tiny":
            tiny_model("llama", folder)
        else:
            cfg = transformers.LlamaConfig(
                hidden_size=4096,
                intermediate_size=14336,
                num_hidden_layers=32,
                num_attention_heads=32,
                num_key_value_heads=8,
                vocab_size=128256,
                max_position_embeddings=16384,
                rope_theta=500000.0,
                tie_word_embeddings=False,
                bos_token_id=0,
                eos_token_id=1,
                pad_token_id=2,
            )
            with torch.device("cuda"):
                model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
            model.save_pretrained(folder, max_shard_size="5GB")
            del model
            torch.cuda.empty_cache()
            tiny_tokenizer(folder)  # ids < 512: throughput does not depend on the text
    data = work / "data.jsonl"
    if not data.exists():
        lines = sample_text(60000, seed=1)
        data.write_text(
            "".join(json.dumps({"text": " ".join(lines[i : i + 40])}) + "\n" for i in range(0, len(lines), 40))
        )
    return folder


# ---------------------------------------------------------------- cap
def run_cap(row: Row, model: Path, work: Path, warmup: int, steps: int, dtype: str, seq: int) -> dict:
    name = row.name
    out, cfg = work / f"cap-{name}", work / f"cap-{name}.toml"
    keys = dict(
        model_dir=str(model),
        output_dir=str(out),
        prepared_dir=str(work / "prepared"),
        lr=2e-5,
        sequence_len=seq,
        model_dtype=dtype,
        max_steps=warmup + steps + 1,
        evals_per_run=0,
        eval_fraction=0.0,
        checkpoint_interval_hours=1000,
        warmup="none",
        **row.cap,
    )
    import torch

    from cap_common.config import load_config, toml_document
    from cap_train.plan import GIB, make_plan

    cfg.write_text(toml_document({**keys, "datasets": [{"dataset_path": str(work / "data.jsonl")}]}))

    device = "cuda" if torch.cuda.is_available() else "cpu"
    plan = max(make_plan(load_config(str(cfg)), 1, device).peaks()) / GIB  # what --plan predicts
    profile = work / f"profile-{name}.json"
    env = dict(os.environ, CAP_PROFILE=f"{warmup + steps + 1}:{profile}")
    cli = [sys.executable, "-c", "from cap_train.cli import main; main()", str(cfg), "--num-gpus", "1"]
    run = subprocess.run(cli, capture_output=True, text=True, env=env, cwd=ROOT)
    if run.returncode:
        last = (run.stderr.strip().splitlines() or ["?"])[-1][:200]
        return {"error": "out of memory" if "out of memory" in run.stderr.lower() else last, "plan_gib": plan}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in rows if warmup < r["step"] <= warmup + steps]
    peak = max(r.get("memory/peak_cuda_gib", r.get("memory/peak_rss_gib", 0.0)) for r in rows)
    return {
        "tokens_per_s": statistics.median(r["train/tokens_per_s"] for r in timed),
        "peak_gib": peak,
        "plan_gib": plan,
        "mfu": statistics.median(r["train/mfu"] for r in timed),
        "profile": json.loads(profile.read_text()) if profile.exists() else None,
    }


# ---------------------------------------------------------------- the peer
def peer_main(model_dir: str, kind: str, settings: str, warmup: int, steps: int, dtype: str) -> None:
    """One process per kind: the model loaded once, then each (gradient checkpointing, seq) of
    `settings` ("1:4096,0:4096"); one JSON line per setting on stdout."""
    import resource

    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    from cap_train.profile import summarize

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    load = dict(dtype=getattr(torch, dtype), attn_implementation="sdpa")
    if kind == "qlora":
        load["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=getattr(torch, dtype),
        )
        load["device_map"] = {"": device.index or 0} if cuda else {"": "cpu"}
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, **load)
    if kind != "qlora":
        model = model.to(device)
    targets = "all-linear" if kind == "qlora" else ["o_proj", "down_proj"]
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, target_modules=targets))
    model.enable_input_require_grads()
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-5)

    def step(ids):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()

    for setting in settings.split(","):
        gc, seq = setting.split(":")
        if gc == "1":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_disable()
        ids = torch.randint(3, 500, (1, int(seq)), device=device)
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            rates = []
            for i in range(warmup + steps):
                t = time.perf_counter()
                step(ids)
                if i >= warmup:
                    rates.append(int(seq) / (time.perf_counter() - t))
            activities = [torch.profiler.ProfilerActivity.CPU] + (
                [torch.profiler.ProfilerActivity.CUDA] if cuda else []
            )
            with torch.profiler.profile(activities=activities, record_shapes=True) as prof:
                t = time.perf_counter()
                step(ids)
                wall = time.perf_counter() - t
            peak = (
                torch.cuda.max_memory_allocated() / 2**30
                if cuda
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
            )
            result = {"tokens_per_s": statistics.median(rates), "peak_gib": peak}
            result["profile"] = summarize(prof, wall, device)
        except torch.OutOfMemoryError:
            result = {"error": "out of memory"}
            opt.zero_grad(set_to_none=True)
        print(json.dumps({"setting": setting, **result}), flush=True)


def run_peers(rows: list[Row], model: Path, warmup: int, steps: int, dtype: str, seq_of) -> dict:
    """{(kind, gc, seq): result} for every peer setting the rows ask for, one process per kind."""
    wanted: dict[str, list[str]] = {}
    for row in rows:
        if row.peer:
            kind, gc = row.peer
            setting = f"{int(gc)}:{seq_of(row)}"
            if setting not in wanted.setdefault(kind, []):
                wanted[kind].append(setting)
    results = {}
    for kind, settings in wanted.items():
        cmd = [sys.executable, __file__, "--peer", str(model), kind, ",".join(settings)]
        cmd += ["--warmup", str(warmup), "--steps", str(steps), "--dtype", dtype]
        run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        lines = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
        for line in lines:
            gc, seq = line.pop("setting").split(":")
            results[(kind, gc == "1", int(seq))] = line
        if run.returncode:
            last = (run.stderr.strip().splitlines() or ["?"])[-1][:200]
            for setting in settings:
                gc, seq = setting.split(":")
                results.setdefault((kind, gc == "1", int(seq)), {"error": last})
    return results


# ---------------------------------------------------------------- the table
def cell(result: dict | None) -> str:
    if result is None:
        return f"{'':>10} {'':>7}"
    if "error" in result:
        return f"{result['error'][:18]:>18}"
    return f"{result['tokens_per_s']:>10,.0f} {result['peak_gib']:>6.1f}G"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--shape", choices=("8b", "tiny"), default="8b")
    ap.add_argument("--rows", default=None, help="comma-separated row names (default: all, in order)")
    ap.add_argument("--budget-s", type=float, default=330.0)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--dtype", default=None, help="default: bfloat16 (8b), float32 (tiny)")
    ap.add_argument("--peer", nargs=3, metavar=("MODEL", "KIND", "SETTINGS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    dtype = args.dtype or ("float32" if args.shape == "tiny" else "bfloat16")
    if args.peer:
        peer_main(*args.peer, args.warmup, args.steps, dtype)
        return
    import torch

    t0 = time.time()
    work = args.work or Path(os.environ.get("WORK", "/tmp/cap-bench-gpu"))
    work.mkdir(parents=True, exist_ok=True)
    rows = ROWS
    if args.rows:
        names = [n.strip() for n in args.rows.split(",")]
        unknown = [n for n in names if n not in {r.name for r in ROWS}]
        if unknown:
            sys.exit(f"bench_gpu: unknown rows {unknown}; rows: {[r.name for r in ROWS]}")
        rows = [r for r in ROWS if r.name in names]
    seq_of = (lambda row: min(row.seq, 64)) if args.shape == "tiny" else (lambda row: row.seq)
    model = write_model(work, args.shape)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    print(
        f"bench_gpu: {device}, torch {torch.__version__}, model {args.shape} ({dtype}), "
        f"{args.warmup} warm-up + {args.steps} timed steps per run",
        flush=True,
    )
    peers = run_peers(rows, model, args.warmup, args.steps, dtype, seq_of)
    head = f"{'setting':<24} {'cap tok/s':>10} {'peak':>7} {'peer tok/s':>10} {'peak':>7} {'speed':>6} {'memory':>6}"
    print(head + "  cap: MFU, --plan's peak")
    report = []
    for row in rows:
        seq = seq_of(row)
        peer = peers.get((row.peer[0], row.peer[1], seq)) if row.peer else None
        if time.time() - t0 > args.budget_s:
            cap = {"error": "skipped (time budget)"}
        else:
            cap = run_cap(row, model, work, args.warmup, args.steps, dtype, seq)
        entry = {"setting": row.name, "seq": seq, "cap": cap, "peer": peer, "peer_kind": row.peer}
        ratio = ""
        if cap and peer and "error" not in cap and "error" not in peer:
            entry["speed"] = cap["tokens_per_s"] / peer["tokens_per_s"]
            entry["memory"] = cap["peak_gib"] / peer["peak_gib"]
            ratio = f"{entry['speed']:>5.2f}x {entry['memory']:>5.2f}x"
        extra = ""
        if cap and "plan_gib" in cap:
            extra = (
                f"  {cap['mfu']:.0%}, plan {cap['plan_gib']:.1f}G" if "mfu" in cap else f"  plan {cap['plan_gib']:.1f}G"
            )
        print(f"{row.name:<24} {cell(cap)} {cell(peer)} {ratio:>13}{extra}", flush=True)
        report.append(entry)
    print("\nwhere the time goes (one profiled step, ms; idle = the GPU waiting for the host):")
    for entry in report:
        for side in ("cap", "peer"):
            result = entry[side]
            if result and result.get("profile"):
                prof = result["profile"]
                parts = ", ".join(f"{k} {v:.0f}" for k, v in list(prof["categories"].items())[:7])
                print(f"  {entry['setting']:<24} {side:<4} {prof['wall_ms']:7.0f} ms: {parts}")
    if args.json:
        args.json.write_text(
            json.dumps({"device": device, "torch": torch.__version__, "shape": args.shape, "rows": report}, indent=1)
        )
        print(f"bench_gpu: wrote {args.json}")
    print(f"bench_gpu: {len(report)} settings in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
