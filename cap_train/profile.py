"""Where a training step's time goes: torch.profiler's op events summed by category.

    CAP_PROFILE=STEP[:FILE] cap-train cfg.toml ...

makes rank 0 profile optimizer step STEP (the whole step: the pipeline engine's forward, backward and
optimizer, then cap's bookkeeping and metrics) and write FILE (default:
<output_dir>/profile-step<STEP>.json), a JSON object:

    {"device": "cuda", "wall_ms": ..., "busy_ms": ..., "categories": {category: ms, ...}}

On a GPU each op counts the device time of the kernels it launched itself (self device time), on a
CPU its self CPU time; `busy_ms` is their sum, and on a GPU "idle" = wall − busy is the time the GPU
waited for the host (launch overhead, syncs, the engine's Python). benchmarks/bench_gpu.py profiles
the peer's loop with the same `summarize`, so the two sides split the same way.
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

from cap_common.errors import CapError

if TYPE_CHECKING:  # torch is imported where it is used: cap-train's launcher process never needs it
    import torch

# (category, name fragments), first match wins; matched against the op name, lower-cased.
_BY_NAME = (
    ("attention", ("scaled_dot_product", "flash", "efficient_attention", "cudnn_attention", "fmha")),
    ("dequantize", ("bitsandbytes", "dequantize")),
    ("loss", ("cap::loss", "cross_entropy", "crossentropy", "linearce", "log_softmax", "nll_loss", "logsumexp")),
    ("optimizer", ("_foreach_", "adam", "multi_tensor")),
    ("communication", ("nccl", "all_reduce", "allreduce", "all_gather", "broadcast", "c10d")),
    ("copies and casts", ("aten::copy_", "aten::_to_copy", "aten::clone", "aten::cat", "aten::contiguous")),
)
_MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_mm")
LOW_RANK = 64  # a matmul with a dimension this small (and 4x below another) is an adapter's (rank r)


def category(name: str, shapes: list | None = None) -> str:
    """The category of an op or record_function by its name; a matmul with a dimension r ≤ LOW_RANK
    and 4r ≤ another (input shapes, when recorded) is an "adapter matmul"."""
    if name in _MATMULS:
        dims = [d for s in (shapes or []) if isinstance(s, (list, tuple)) and len(s) >= 2 for d in s[-2:]]
        low_rank = dims and min(dims) <= LOW_RANK and 4 * min(dims) <= max(dims)
        return "adapter matmul" if low_rank else "matmul"
    lower = name.lower()
    for cat, fragments in _BY_NAME:
        if any(f in lower for f in fragments):
            return cat
    return "elementwise, norms, rotary, activations"


def summarize(prof: torch.profiler.profile, wall_s: float, device: torch.device) -> dict:
    """Per-category milliseconds of a finished profile (see the module docstring)."""
    import torch

    cuda = device.type == "cuda"
    ms: dict[str, float] = defaultdict(float)
    for event in prof.events():
        # A kernel counts for the innermost op or record_function active when it was launched (a
        # Triton kernel launched from Python: cap's loss kernels count for "cap::loss").
        own = event.self_device_time_total if cuda else event.self_cpu_time_total
        if own > 0 and event.device_type == torch.autograd.DeviceType.CPU:
            ms[category(event.name, event.input_shapes)] += own / 1000
    busy = sum(ms.values())
    out = {"device": device.type, "wall_ms": wall_s * 1000, "busy_ms": busy}
    if cuda:
        ms["idle (GPU waits for the host)"] = max(wall_s * 1000 - busy, 0.0)
    out["categories"] = dict(sorted(ms.items(), key=lambda kv: -kv[1]))
    return out


def parse(spec: str) -> tuple[int, str]:
    """CAP_PROFILE's value → (step, file or ""); CapError in one line for anything else."""
    step, _, path = spec.partition(":")
    if not step.isdigit() or int(step) < 1:
        raise CapError(f"CAP_PROFILE={spec}: expected STEP or STEP:FILE, STEP an optimizer step (1, 2, ...)")
    return int(step), path


class StepProfile:
    """Profiles one optimizer step when CAP_PROFILE=STEP[:FILE] names it (rank 0 only)."""

    def __init__(self, spec: str | None, enabled: bool, device: torch.device, output_dir: Path):
        self.step, self.path, self.device = None, None, device
        if spec and enabled:
            self.step, path = parse(spec)
            self.path = Path(path) if path else Path(output_dir) / f"profile-step{self.step}.json"
        self.prof = None

    @classmethod
    def from_env(cls, enabled: bool, device: torch.device, output_dir: Path) -> StepProfile:
        return cls(os.environ.get("CAP_PROFILE"), enabled, device, output_dir)

    def begin(self, step: int) -> None:
        """Call before optimizer step `step` (1-based) starts."""
        if step != self.step:
            return
        import torch

        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
            torch.cuda.synchronize(self.device)
        self.prof = torch.profiler.profile(activities=activities, record_shapes=True)
        self.prof.start()
        self.t0 = time.perf_counter()

    def end(self) -> None:
        """Call when the step (and its bookkeeping) is done."""
        if self.prof is None:
            return
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        wall = time.perf_counter() - self.t0
        self.prof.stop()
        summary = summarize(self.prof, wall, self.device)
        self.prof = None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(summary, indent=1) + "\n")
