"""What a run reports: TensorBoard scalars under <output_dir>/tensorboard/, the same values as
JSON lines in <output_dir>/metrics.jsonl (one object per step, easy to grep or plot), one
console line per step, and for each eval a progress line every EVAL_PROGRESS_S seconds and a
summary line at its end.

A write that fails (a full disk, ...) stops the run with one line naming the file or folder.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

from tensorboard.compat.proto.summary_pb2 import Summary

from cap_common.files import user_os_errors

EVAL_PROGRESS_S = 5.0  # at most one eval progress line per this many seconds


def clock(seconds: float) -> str:
    """`H:MM:SS`."""
    h, rem = divmod(int(seconds), 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}"


def _quiet_writer_thread_errors() -> None:
    """TensorBoard's writer thread prints the traceback of a failed write (a full disk) and hands
    the error to the next call of the main thread, which reports it in one line (Metrics): print
    nothing for it. Installed once; other threads' errors print as before."""
    previous = threading.excepthook
    if getattr(previous, "cap_quiet", False):
        return

    def hook(args) -> None:
        if type(args.thread).__name__ == "_AsyncWriterThread" and issubclass(args.exc_type, OSError):
            return
        previous(args)

    hook.cap_quiet = True
    threading.excepthook = hook


class Metrics:
    """Rank 0's TensorBoard writer and progress line; on other ranks every call does nothing."""

    def __init__(self, output_dir: Path, enabled: bool, total_steps: int, start_step: int = 0):
        self.enabled = enabled
        self.total_steps = total_steps
        self.start_step = start_step
        self.t0 = time.time()
        self.writer = self.jsonl = None
        self.tensorboard = Path(output_dir) / "tensorboard"
        self.jsonl_path = Path(output_dir) / "metrics.jsonl"
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            _quiet_writer_thread_errors()
            with user_os_errors(self.tensorboard):
                self.writer = SummaryWriter(str(self.tensorboard))
            with user_os_errors(self.jsonl_path):
                self.jsonl = open(self.jsonl_path, "a")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is not None and values:
            # One event holding every scalar of the step, which TensorBoard reads as one scalar per
            # tag: 40x less host time than add_scalar per value (450 values with LoRA on every
            # linear of an 8B model: 1 ms instead of 45 ms per step, while the GPU waits).
            summary = Summary(value=[Summary.Value(tag=name, simple_value=float(v)) for name, v in values.items()])
            with user_os_errors(self.tensorboard):
                self.writer.file_writer.add_summary(summary, step)
            with user_os_errors(self.jsonl_path):
                self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
                self.jsonl.flush()

    def progress(self, step: int, loss: float, tokens_per_s: float, lr: float, mfu: float) -> None:
        """`step 12/400  loss 2.3456  lr 1.2e-05  1,234 tok/s  MFU 41.2%  ETA 0:05:12`"""
        if not self.enabled:
            return
        done = step - self.start_step
        eta = (time.time() - self.t0) / max(done, 1) * (self.total_steps - step)
        print(
            f"step {step}/{self.total_steps}  loss {loss:.4f}  lr {lr:.3g}  {tokens_per_s:,.0f} tok/s  MFU {mfu:.1%}  "
            f"ETA {clock(eta)}",
            file=sys.stderr,
            flush=True,
        )

    def close(self) -> None:
        if self.writer is not None:
            with user_os_errors(self.tensorboard):
                self.writer.flush()  # raises what the writer thread met; close() would drop it
                self.writer.close()
            with user_os_errors(self.jsonl_path):
                self.jsonl.close()


class EvalProgress:
    """Rank 0's lines for one eval (on other ranks every call does nothing):
    `eval at step 0: 1,200/47,625 sequences  80 seq/s  ETA 0:09:40`, at most one per
    EVAL_PROGRESS_S seconds, and at the end
    `eval at step 0: loss 2.3456 (class +1 2.1000, class -1 2.6000)  47,625 sequences in 0:09:55`."""

    def __init__(self, enabled: bool, step: int, sequences: int):
        self.enabled, self.step, self.sequences = enabled, step, sequences
        self.t0 = self.shown = time.monotonic()

    def update(self, done: int) -> None:
        """`done` of the eval's sequences are evaluated."""
        now = time.monotonic()
        if not self.enabled or now - self.shown < EVAL_PROGRESS_S or done >= self.sequences:
            return
        self.shown = now
        rate = done / max(now - self.t0, 1e-9)
        print(
            f"eval at step {self.step}: {done:,}/{self.sequences:,} sequences  {rate:,.1f} seq/s  "
            f"ETA {clock((self.sequences - done) / max(rate, 1e-9))}",
            file=sys.stderr,
            flush=True,
        )

    def finish(self, losses: dict[str, float]) -> None:
        """The summary line; `losses` as Trainer.evaluate returns them (eval/loss_all, eval/loss_class±1)."""
        if not self.enabled:
            return
        by_class = ", ".join(
            f"class {c} {losses[f'eval/loss_class{c}']:.4f}" for c in ("+1", "-1") if f"eval/loss_class{c}" in losses
        )
        loss = f"loss {losses['eval/loss_all']:.4f}" if "eval/loss_all" in losses else "no loss (no labelled tokens)"
        print(
            f"eval at step {self.step}: {loss}{f' ({by_class})' if by_class else ''}  "
            f"{self.sequences:,} sequences in {clock(time.monotonic() - self.t0)}",
            file=sys.stderr,
            flush=True,
        )
