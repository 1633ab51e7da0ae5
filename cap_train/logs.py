"""Where a worker's output goes, and how a worker that fails says so.

Each rank writes everything — its own lines, DeepSpeed's and torch's, C-level messages, tracebacks —
to `<output_dir>/logs/<run>/rank<r>.log` (file descriptors 1 and 2 point there). Python-level
output of rank 0 (progress, cap-prep's summary, warnings) is also shown on the console; other
ranks show only their one-line errors. So when one rank dies, the others' collateral errors
("Connection reset by peer") stay in their logs, and the console shows one line naming the rank
that failed (printed here for Python errors, by cap_train.launch for signals).

Exit codes of a worker: 0 done; 2 a user error (one line printed); 1 a crash (one line printed,
traceback in the log); 3 it lost a peer (printed nothing: another rank is the cause); 4 it lost a
peer and printed the line naming it (cap_train.watch).
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import traceback
from pathlib import Path

from cap_common.files import HOST

EXIT_CRASH, EXIT_USER, EXIT_PEER_LOST, EXIT_PEER_NAMED = 1, 2, 3, 4
# Text of errors a rank sees when a peer died or vanished: gloo's socket errors, NCCL's aborts, timeouts.
_PEER_SIGNS = (
    "Connection reset by peer",
    "Connection closed by peer",
    "Broken pipe",
    "Connection refused",
    "gloo/transport",
    "NCCL communicator was aborted",
    "remote process exited",
    "Socket Timeout",
    "Timed out",
    "timed out",
)


class _Tee(io.TextIOBase):
    """A text stream writing to the log (always) and to the console (when given)."""

    def __init__(self, log, console, fileno: int):
        self.log, self.console, self._fileno = log, console, fileno

    def write(self, text: str) -> int:
        for stream in (self.console, self.log):
            if stream is not None:
                try:
                    stream.write(text)
                    stream.flush()
                except (OSError, ValueError):  # a full disk must not take the console with it
                    pass
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return self.console is not None and self.console.isatty()

    def fileno(self) -> int:
        return self._fileno


class RankOutput:
    """This process's output routing (see the module docstring); `console_line` reaches the user."""

    def __init__(self, log_dir: str | None, rank: int):
        self.rank = rank
        self.log_path: Path | None = None
        self.console = sys.stderr
        if not log_dir:
            return
        try:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            log_fd = os.open(Path(log_dir) / f"rank{rank}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
        except OSError as e:
            print(
                f"cap-train: warning (rank {rank}): cannot write logs in {log_dir} ({e.strerror}); "
                "output stays on the console",
                file=sys.stderr,
                flush=True,
            )
            return
        self.log_path = Path(log_dir) / f"rank{rank}.log"
        sys.stdout.flush()
        sys.stderr.flush()
        console_out = os.fdopen(os.dup(1), "w", buffering=1)
        console_err = os.fdopen(os.dup(2), "w", buffering=1)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.close(log_fd)
        log = os.fdopen(os.dup(2), "w", buffering=1)
        self.console = console_err
        shown = rank == 0
        sys.stdout = _Tee(log, console_out if shown else None, 1)
        sys.stderr = _Tee(log, console_err if shown else None, 2)
        self._log = log

    @contextlib.contextmanager
    def log_only(self):
        """Within the block, Python-level output goes to the log alone (library chatter, e.g.
        DeepSpeed's layer listing while it builds the pipeline)."""
        if self.log_path is None:
            yield
            return
        saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Tee(self._log, None, 1), _Tee(self._log, None, 2)
        try:
            yield
        finally:
            sys.stdout, sys.stderr = saved

    def console_line(self, line: str) -> None:
        """One line for the user, on the console and in this rank's log, from any rank."""
        try:
            self.console.write(line + "\n")
            self.console.flush()
        except (OSError, ValueError):
            pass
        if self.log_path is not None and self.rank != 0:
            try:
                self._log.write(line + "\n")
            except (OSError, ValueError):
                pass

    def where(self) -> str:
        return str(self.log_path) if self.log_path else "the console output above"


def lost_peer(error: BaseException) -> bool:
    """True for the errors a rank gets because another rank died (not a cause of its own)."""
    import torch.distributed as dist

    dist_errors = tuple(
        getattr(dist, n) for n in ("DistBackendError", "DistNetworkError", "DistStoreError") if hasattr(dist, n)
    )
    if dist_errors and isinstance(error, dist_errors):
        return True
    text = str(error)
    return isinstance(error, (RuntimeError, ConnectionError, TimeoutError)) and any(s in text for s in _PEER_SIGNS)


def report_crash(output: RankOutput, error: BaseException) -> int:
    """Log the traceback; print one line unless the error is collateral; return the exit code."""
    traceback.print_exception(error, file=sys.__stderr__ if output.log_path else sys.stderr)
    try:
        sys.__stderr__.flush()
    except (OSError, ValueError):
        pass
    if lost_peer(error):
        return EXIT_PEER_LOST
    first = (str(error).strip().splitlines() or [""])[0][:300]
    output.console_line(
        f"cap-train: rank {output.rank} on {HOST} failed: {type(error).__name__}: {first} (traceback: {output.where()})"
    )
    return EXIT_CRASH
