"""cap-export at Llama-3.1-8B scale, on random weights: factored additive conversion vs the dense
full-SVD method, and merge peak memory vs the largest shard.

    python -m benchmarks.bench_export                      # Llama-3.1-8B shapes: 32 layers, H 4096, I 14336, r 16
    python -m benchmarks.bench_export --layers 8 --shard-layers 2   # smaller, same per-layer shapes

A temporary base folder holds random bf16 writer weights (o_proj [H,H], down_proj [H,I] per layer;
nothing else is needed by either command) in safetensors shards of --shard-layers layers with an
index, plus a Llama config.json. Reported:
- additive: wall time of `convert.additive` (reads every shard, V·M in float64, thin factors) vs
  the full-SVD method — ΔM = (U·V)·M dense in float32, torch.linalg.svd, keep rank k — timed on
  --svd-layers layers and extrapolated to all. Both results are compared (same ΔM up to fp32).
  Target: ≥ 100× faster.
- merge: peak RSS of a `cap-export merge` subprocess (its VmHWM), against the largest
  shard; also the RSS of a child that only imports the same modules (Python + torch baseline).
  Target: peak ≤ 1.5 × largest shard.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]


def write_base(folder: Path, layers: int, hidden: int, inter: int, shard_layers: int, seed: int = 0) -> list[Path]:
    """Random bf16 writer weights in shards + index + config.json; returns the shard paths."""
    g = torch.Generator().manual_seed(seed)
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "rms_norm_eps": 1e-5,
        "torch_dtype": "bfloat16",
    }
    (folder / "config.json").write_text(json.dumps(config))
    n_shards = -(-layers // shard_layers)
    weight_map, shards, total = {}, [], 0
    for s in range(n_shards):
        name = f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors"
        tensors = {}
        for i in range(s * shard_layers, min(layers, (s + 1) * shard_layers)):
            tensors[f"model.layers.{i}.self_attn.o_proj.weight"] = (
                torch.randn(hidden, hidden, generator=g) / hidden**0.5
            ).to(torch.bfloat16)
            tensors[f"model.layers.{i}.mlp.down_proj.weight"] = (
                torch.randn(hidden, inter, generator=g) / inter**0.5
            ).to(torch.bfloat16)
        save_file(tensors, folder / name, metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, name))
        shards.append(folder / name)
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return shards


def write_control(folder: Path, layers: int, hidden: int, rank: int, seed: int = 1) -> None:
    from cap_common.adapters.io import control_tensors, save_adapter

    g = torch.Generator().manual_seed(seed)
    states = {
        i: {"A": torch.randn(rank, hidden, generator=g) * 0.02, "B": torch.randn(hidden, rank, generator=g) * 0.02}
        for i in range(layers)
    }
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": float(rank),
        "target_modules": [],
        "control_adapter_type": "full",
        "control_adapter_target": "writers",
    }
    save_adapter(folder, control_tensors(states), config)


def full_svd_method(control, base, layers: list[int], rank: int) -> tuple[float, dict]:
    """The dense method on `layers`: ΔM = W'·M (W' dense H×H), SVD, truncate to `rank`. Returns
    (seconds, {writer name: (U_k·diag(σ_k), V_k)}) — the time excludes reading the weights."""
    from cap_export.convert import layer_and_path

    names = [name for layer in layers for name in base.writer_names(layer)]
    weights = dict(base.read_by_file(names))
    seconds, out = 0.0, {}
    for name in names:
        layer, _ = layer_and_path(name)
        start = time.perf_counter()
        U, V = control.factors(layer)
        W = (U @ V).float()  # H×H
        dM = W @ weights[name].float()  # H×in
        X, sigma, Yt = torch.linalg.svd(dM, full_matrices=False)
        out[name] = (X[:, :rank] * sigma[:rank], Yt[:rank])
        seconds += time.perf_counter() - start
    return seconds, out


# The child reports its own high-water RSS (VmHWM: this process image only; getrusage's ru_maxrss
# would also count the parent's memory, inherited across fork + exec).
_MEASURE = """
import runpy, sys
sys.argv = sys.argv[1:]
code = 0
try:
    if sys.argv[0] == "-c":
        exec(sys.argv[1])
    else:
        runpy.run_module(sys.argv[0], run_name="__main__")
except SystemExit as e:
    code = e.code or 0
hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM:")][0]
print("PEAK_RSS_KB", int(hwm.split()[1]))
sys.exit(code)
"""


def child_peak_rss(args: list[str]) -> tuple[float, str]:
    """Peak RSS (bytes) of a fresh Python child running `-m module args…` or `-c code`, and its output."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", _MEASURE, *args], capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(f"child failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    lines = proc.stdout.strip().splitlines()
    peak = int(lines[-1].split()[1]) * 1024.0
    return peak, "\n".join(lines[:-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=14336)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--shard-layers", type=int, default=8, help="decoder layers per shard")
    p.add_argument("--svd-layers", type=int, default=1, help="layers the full-SVD method is timed on (0: skip it)")
    p.add_argument("--workdir", type=Path, default=None, help="where the temporary folders go")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads, here and in the merge child "
        "(default: torch's; 1 is fairer on a machine other jobs keep busy)",
    )
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)

    from cap_common.adapters.io import lora_key
    from cap_export import convert
    from cap_export.adapters import load_control
    from cap_export.base import Base

    full = (args.layers, args.hidden, args.intermediate, args.rank) == (32, 4096, 14336, 16)
    print(
        f"shapes: {args.layers} layers, H {args.hidden}, I {args.intermediate}, rank {args.rank} "
        f"({'Llama-3.1-8B scale' if full else 'scaled down from Llama-3.1-8B: 32 layers, H 4096, I 14336, rank 16'}); "
        f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    work = Path(tempfile.mkdtemp(prefix="cap-bench-export-", dir=args.workdir))
    try:
        start = time.perf_counter()
        base_dir, ckpt = work / "base", work / "ckpt"
        base_dir.mkdir()
        shards = write_base(base_dir, args.layers, args.hidden, args.intermediate, args.shard_layers)
        write_control(ckpt, args.layers, args.hidden, args.rank)
        largest = max(s.stat().st_size for s in shards)
        print(
            f"wrote {len(shards)} shards ({sum(s.stat().st_size for s in shards) / 2**30:.2f} GiB, largest "
            f"{largest / 2**30:.2f} GiB) in {time.perf_counter() - start:.0f} s"
        )

        control, base = load_control(ckpt), Base(base_dir)
        base.writer_names(0)  # imports the family's modeling code once (not part of either method)
        start = time.perf_counter()
        converted = convert.additive(control, base, progress=False)
        factored = time.perf_counter() - start
        print(
            f"additive, factored: {factored:.1f} s for {args.layers} layers "
            f"({factored / args.layers * 1e3:.0f} ms/layer, shard reads included)"
        )
        svd_layers = list(range(min(args.svd_layers, args.layers)))
        if svd_layers:
            svd_seconds, dense = full_svd_method(control, base, svd_layers, args.rank)
            svd_total = svd_seconds / len(svd_layers) * args.layers
            worst = 0.0
            for name, (Bd, Ad) in dense.items():
                layer, path = convert.layer_and_path(name)
                A, B = converted.tensors[lora_key(layer, path, "A")], converted.tensors[lora_key(layer, path, "B")]
                ref = Bd.double() @ Ad.double()
                worst = max(worst, float((B.double() @ A.double() - ref).norm() / ref.norm()))
            print(
                f"additive, full SVD: {svd_seconds:.1f} s for {len(svd_layers)} layer(s) → {svd_total:.0f} s for "
                f"{args.layers} layers (extrapolated; weight reads excluded)"
            )
            print(
                f"speed-up: {svd_total / factored:.0f}× (target ≥ 100×); results agree to {worst:.1e} "
                f"(relative Frobenius)"
            )
            del dense

        lora_dir = work / "lora"
        convert.save(converted, lora_dir)
        del converted
        start = time.perf_counter()
        peak, out = child_peak_rss(["cap_export.cli", "merge", str(base_dir), str(lora_dir), str(work / "merged")])
        merge_seconds = time.perf_counter() - start
        baseline, _ = child_peak_rss(["-c", "import torch, safetensors, transformers, tqdm; import cap_export.merge"])
        print(
            f"merge: {merge_seconds:.0f} s; peak RSS {peak / 2**30:.2f} GiB vs largest shard {largest / 2**30:.2f} GiB "
            f"= {peak / largest:.2f}× (target ≤ 1.5×); import-only baseline {baseline / 2**30:.2f} GiB, "
            f"so the merge itself adds {(peak - baseline) / 2**30:.2f} GiB = {(peak - baseline) / largest:.2f}× a shard"
        )
        print(f"  {out.splitlines()[-1] if out else ''}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
