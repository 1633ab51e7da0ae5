"""What a run reports: TensorBoard scalars under <output_dir>/tensorboard/, the same values as
JSON lines in <output_dir>/metrics.jsonl (one object per step, easy to grep or plot), and one
console line per step."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


class Metrics:
    """Rank 0's TensorBoard writer and progress line; on other ranks every call does nothing."""

    def __init__(self, output_dir: Path, enabled: bool, total_steps: int, start_step: int = 0):
        self.enabled = enabled
        self.total_steps = total_steps
        self.start_step = start_step
        self.t0 = time.time()
        self.writer = self.jsonl = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(output_dir) / "tensorboard"))
            self.jsonl = open(Path(output_dir) / "metrics.jsonl", "a")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is not None and values:
            for name, value in values.items():
                self.writer.add_scalar(name, value, step)
            self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
            self.jsonl.flush()

    def progress(self, step: int, loss: float, tokens_per_s: float, lr: float, mfu: float) -> None:
        """`step 12/400  loss 2.3456  lr 1.2e-05  1,234 tok/s  MFU 41.2%  ETA 0:05:12`"""
        if not self.enabled:
            return
        done = step - self.start_step
        eta = (time.time() - self.t0) / max(done, 1) * (self.total_steps - step)
        h, rem = divmod(int(eta), 3600)
        print(
            f"step {step}/{self.total_steps}  loss {loss:.4f}  lr {lr:.3g}  {tokens_per_s:,.0f} tok/s  MFU {mfu:.1%}  "
            f"ETA {h}:{rem // 60:02d}:{rem % 60:02d}",
            file=sys.stderr,
            flush=True,
        )

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
            self.jsonl.close()
