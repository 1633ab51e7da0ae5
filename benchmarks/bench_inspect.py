"""`cap-export inspect` on a 70B-sized Control Adapter: 80 layers, hidden 8192, rank 64.

    python -m benchmarks.bench_inspect                       # full: 80 layers, H 8192, r 64, type full
    python -m benchmarks.bench_inspect --type symmetrise     # k = 2r = 128 factors per layer
    python -m benchmarks.bench_inspect --layers 8            # smaller

A temporary folder holds random float32 factors saved as training writes them (control_A [r,H],
control_B [H,r]; spectral: an orthonormal Q and S). Reported, median of --repeats runs:
- in-process: `inspect_adapter.inspect` + the table (load, checks, float64 factors, QR of U and
  Vᵀ and an SVD of the k×k core per layer; no H×H matrix);
- command: a fresh `python -m cap_export.cli inspect` process, and how much of it is only starting
  Python and importing torch (a process that imports cap_export.inspect_adapter and exits).
Target: a few seconds on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def write_control(folder: Path, adapter_type: str, layers: int, hidden: int, rank: int, seed: int = 0) -> None:
    from cap_common.adapters.io import control_tensors, save_adapter

    g = torch.Generator().manual_seed(seed)
    states = {}
    for i in range(layers):
        if adapter_type == "spectral":
            Q = torch.linalg.qr(torch.randn(hidden, rank, generator=g)).Q
            states[i] = {"Q": Q, "S": torch.randn(rank, generator=g) * 0.1}
        else:
            states[i] = {
                "A": torch.randn(rank, hidden, generator=g) * 0.01,
                "B": torch.randn(hidden, rank, generator=g) * 0.01,
            }
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": float(rank),
        "target_modules": [],
        "layers_to_transform": list(range(layers)),
        "control_adapter_type": adapter_type,
        "control_adapter_target": "writers",
    }
    save_adapter(folder, control_tensors(states), config)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=80)
    p.add_argument("--hidden", type=int, default=8192)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--type", default="full", choices=("full", "symmetrise", "antisymmetrise", "spectral"))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workdir", type=Path, default=None, help="where the temporary folder goes")
    args = p.parse_args()

    from cap_export.inspect_adapter import inspect

    print(
        f"{args.type} adapter: {args.layers} layers, H {args.hidden}, rank {args.rank}; torch threads "
        f"{torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    work = Path(tempfile.mkdtemp(prefix="cap-bench-inspect-", dir=args.workdir))
    try:
        ckpt = work / "epoch1"
        start = time.perf_counter()
        write_control(ckpt, args.type, args.layers, args.hidden, args.rank)
        size = (ckpt / "adapter_model.safetensors").stat().st_size
        print(f"wrote {size / 2**20:.0f} MiB in {time.perf_counter() - start:.1f} s")

        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            lines = inspect(ckpt).table()
            times.append(time.perf_counter() - start)
        print(f"  {lines[-1]}")
        print(
            f"in-process inspect + table: median {statistics.median(times):.2f} s of {args.repeats} "
            f"({', '.join(f'{t:.2f}' for t in times)})"
        )

        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        command = [sys.executable, "-m", "cap_export.cli", "inspect", str(ckpt)]
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
            times.append(time.perf_counter() - start)
            if proc.returncode:
                raise SystemExit(f"cap-export inspect failed ({proc.returncode}): {proc.stderr.strip()}")
        baseline = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-c", "import cap_export.inspect_adapter"], env=env, cwd=ROOT, check=True)
            baseline.append(time.perf_counter() - start)
        print(
            f"command `cap-export inspect`: median {statistics.median(times):.2f} s of {args.repeats} "
            f"({', '.join(f'{t:.2f}' for t in times)}), of which Python start-up and imports (torch) "
            f"{statistics.median(baseline):.2f} s"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
