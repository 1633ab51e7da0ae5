"""Peak memory and time of the fused LM head + loss against the unfused torch loss, fwd + bwd.

    unfused: logits = h·Wᵀ [N, V]; F.cross_entropy(logits.float(), y)   (as transformers does;
             --no-upcast keeps the logits in the input dtype)
    fused:   kernels.fused_linear_cross_entropy(h, W, y)                 (chunk × V at a time)

CUDA: peak = torch.cuda.max_memory_allocated − allocated before the step (inputs excluded), time by
CUDA events (median of --repeats after one warm-up). CPU (torch path): each measurement runs in a
fresh subprocess; peak = ru_maxrss after the step − RSS before it (resource.getrusage; psutil for
the RSS before when installed), time by perf_counter. Configurations whose unfused logits would not
fit are reported as OOM (CUDA OutOfMemoryError, CPU allocation failure or killed child).

    python benchmarks/bench_loss.py                                   # GPU: seq 2k/8k/32k × V 32k/128k
    python benchmarks/bench_loss.py --hidden 256 --seqs 2048,8192 --vocabs 32000 --dtype fp32
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cap_kernels.fused_linear_ce import fused_linear_cross_entropy  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def make_inputs(seq, vocab, args, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    dtype = DTYPES[args.dtype]
    h = torch.randn(seq, args.hidden, generator=g).to(device, dtype).requires_grad_()
    w = (torch.randn(vocab, args.hidden, generator=g) / args.hidden**0.5).to(device, dtype)
    w.requires_grad_(args.train_weight)
    y = torch.randint(0, vocab, (seq,), generator=g).to(device)
    y[: seq // 10] = -100  # a prompt that is masked out
    return h, w, y


def step(method, h, w, y, args):
    """One forward + backward; returns the loss as a float."""
    h.grad = w.grad = None
    if method == "fused":
        loss = fused_linear_cross_entropy(h, w, y, softcap=args.softcap, chunk_size=args.chunk_size, impl=args.impl)
    else:
        logits = h @ w.T
        logits = logits if args.no_upcast else logits.float()
        if args.softcap:
            logits = args.softcap * torch.tanh(logits / args.softcap)
        loss = F.cross_entropy(logits, y)
    loss.backward()
    return loss.item()


def measure_cuda(method, seq, vocab, args):
    try:
        h, w, y = make_inputs(seq, vocab, args, "cuda")
        step(method, h, w, y, args)  # warm-up (Triton compile)
        torch.cuda.synchronize()
        times = []
        for _ in range(args.repeats):
            h.grad = w.grad = None
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            loss = step(method, h, w, y, args)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        peak = torch.cuda.max_memory_allocated() - before
        return dict(peak_mib=peak / 2**20, ms=statistics.median(times), loss=loss)
    except torch.cuda.OutOfMemoryError:
        return None
    finally:
        h = w = y = None
        torch.cuda.empty_cache()


def rss_bytes():
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:  # ru_maxrss is a high-water mark, so this over-states "before"
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_cpu_child(method, seq, vocab, args):
    """Runs in its own process: the RSS high-water mark then belongs to this one step."""
    torch.set_num_threads(args.threads or torch.get_num_threads())
    h, w, y = make_inputs(seq, vocab, args, "cpu")
    before = rss_bytes()
    start = time.perf_counter()
    loss = step(method, h, w, y, args)
    ms = (time.perf_counter() - start) * 1e3
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    return dict(peak_mib=peak / 2**20, ms=ms, loss=loss)


def measure_cpu(method, seq, vocab, args):
    """Median over --repeats fresh processes (peak memory and time)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", f"{method},{seq},{vocab}"] + args.argv
    runs = []
    for _ in range(args.repeats):
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            if out.returncode < 0 or "memory" in out.stderr:
                return None
            raise RuntimeError(out.stderr)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def fmt(r, key, spec):
    return "OOM" if r is None else format(r[key], spec)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seqs", default="2048,8192,32768", help="tokens per step (comma list)")
    p.add_argument("--vocabs", default="32000,128256", help="vocab sizes (comma list)")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--impl", default="auto", help="fused loss impl: auto, triton or torch")
    p.add_argument("--chunk-size", type=int, default=None, help="fused rows per chunk (default auto)")
    p.add_argument("--softcap", type=float, default=None)
    p.add_argument("--train-weight", action="store_true", help="LM head requires grad (full FT)")
    p.add_argument("--no-upcast", action="store_true", help="unfused CE on logits in the input dtype")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="CPU threads")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    raw = list(sys.argv[1:] if argv is None else argv)
    if "--child" in raw:
        i = raw.index("--child")
        del raw[i : i + 2]
    args.argv = raw
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = args.dtype or ("bf16" if device == "cuda" else "fp32")

    if args.child:
        method, seq, vocab = args.child.split(",")
        print(json.dumps(measure_cpu_child(method, int(seq), int(vocab), args)), flush=True)
        return

    measure = measure_cuda if device == "cuda" else measure_cpu
    how = (
        "torch.cuda.max_memory_allocated, CUDA events"
        if device == "cuda"
        else "ru_maxrss − RSS before (fresh process per run), perf_counter"
    )
    print(
        f"device={device} dtype={args.dtype} hidden={args.hidden} train_weight={args.train_weight} "
        f"impl={args.impl} upcast={not args.no_upcast}; peak memory: {how}"
    )
    head = (
        f"{'seq':>6} {'vocab':>7} | {'unfused MiB':>11} {'fused MiB':>9} {'mem ×':>6} | "
        f"{'unfused ms':>10} {'fused ms':>8} {'time ×':>6} | {'loss Δ':>8}"
    )
    print(head)
    print("-" * len(head))
    for vocab in (int(v) for v in args.vocabs.split(",")):
        for seq in (int(s) for s in args.seqs.split(",")):
            unfused = measure("unfused", seq, vocab, args)
            fused = measure("fused", seq, vocab, args)
            both = unfused is not None and fused is not None
            mem = format(unfused["peak_mib"] / max(fused["peak_mib"], 1e-9), "6.1f") if both else "-"
            tim = format(fused["ms"] / unfused["ms"], "6.2f") if both else "-"
            dl = format(abs(fused["loss"] - unfused["loss"]), "8.1e") if both else "-"
            print(
                f"{seq:>6} {vocab:>7} | {fmt(unfused, 'peak_mib', '11.0f')} "
                f"{fmt(fused, 'peak_mib', '9.0f')} {mem:>6} | {fmt(unfused, 'ms', '10.1f')} "
                f"{fmt(fused, 'ms', '8.1f')} {tim:>6} | {dl:>8}",
                flush=True,
            )


if __name__ == "__main__":
    main()
