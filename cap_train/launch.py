"""The single-node launcher: start one worker process per rank, watch them, and when one fails
stop the others and say in one line which rank failed and how.

Each worker gets the environment DeepSpeed's and torch's launchers give (RANK, LOCAL_RANK,
WORLD_SIZE, LOCAL_SIZE, MASTER_ADDR, MASTER_PORT); CUDA_VISIBLE_DEVICES lists the GPUs cap-train
chose (cap_train.devices), so LOCAL_RANK indexes them. Workers route their own output
(cap_train.logs); this process only reports:
- a rank killed by a signal: `rank 1 (pid …) on HOST was killed by SIGKILL (signal 9)`;
- a rank that exited with an unexpected code: that code;
- a rank that printed its own error line (exit 1 or 2): nothing more;
- ranks that only lost a peer (exit 3) are never named as the cause when another rank failed.
The first failure stops the run: the other ranks get SIGTERM, then SIGKILL after a grace period.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from cap_common.files import HOST
from cap_train.logs import EXIT_CRASH, EXIT_PEER_LOST, EXIT_PEER_NAMED, EXIT_USER

POLL_S = 0.05
SETTLE_S = 3.0  # after a rank that only lost its peer exits, how long to wait for the cause to show
GRACE_S = 10.0  # SIGTERM → SIGKILL


def die_with_parent(say) -> None:
    """A worker that this module's launcher started (`run_local` names itself in CAP_LAUNCHER_PID, and
    it is the worker's parent) ends when the launcher ends, even by SIGKILL, so that it never outlives it
    (an orphaned rank would hold its CPU, GPU or port); before it ends it calls `say(why)` with one line
    for its rank log. A worker that anything else started (a script that exits, pdsh/ssh, mpirun) is left
    alone: its parent may exit while it trains on.

    Linux: PR_SET_PDEATHSIG delivers SIGUSR1 when the launcher ends, and a thread watches the parent
    pid, for the times the main thread is inside a long call (a collective) and cannot run the handler.
    The exit code is 128 + SIGTERM, as when the launcher's SIGTERM stops a rank."""
    import threading

    from cap_common.files import pid_alive

    launcher = os.environ.pop("CAP_LAUNCHER_PID", "")  # not for what this worker starts in turn
    if not sys.platform.startswith("linux") or not launcher.isdigit():
        return
    launcher_pid = int(launcher)
    if os.getppid() != launcher_pid and pid_alive(launcher_pid):
        return  # another process started it and passed the variable on: not the launcher's worker
    once = threading.Lock()

    def gone() -> None:
        if once.acquire(blocking=False):  # the first of the handler and the watcher says it and exits
            say(f"the cap-train launcher that started this worker (pid {launcher_pid}) is gone")
            os._exit(128 + signal.SIGTERM)

    def on_signal(signum, frame) -> None:
        if os.getppid() != launcher_pid:  # a SIGUSR1 from anyone else is ignored
            gone()

    def watch() -> None:
        while os.getppid() == launcher_pid:
            time.sleep(0.5)
        gone()

    signal.signal(signal.SIGUSR1, on_signal)
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGUSR1)  # 1 = PR_SET_PDEATHSIG
    threading.Thread(target=watch, name="cap-launcher-watch", daemon=True).start()  # also: gone before prctl


@dataclass
class Failure:
    rank: int
    pid: int
    code: int  # Popen.returncode: negative = killed by that signal

    def describe(self) -> str:
        who = f"rank {self.rank} (pid {self.pid}) on {HOST}"
        if self.code < 0:
            sig = -self.code
            try:
                name = signal.Signals(sig).name
            except ValueError:
                name = f"signal {sig}"
            hint = " — often the kernel's out-of-memory killer (see `dmesg`)" if sig == signal.SIGKILL else ""
            return f"{who} was killed by {name} (signal {sig}){hint}"
        if self.code == EXIT_PEER_LOST:
            return f"{who} lost contact with the other ranks"
        if self.code == 130:
            return f"{who} was interrupted (Ctrl-C)"
        return f"{who} exited with code {self.code}"


def _cause(failures: list[Failure]) -> Failure:
    """The failure to blame: a rank's own error or death before one that only lost a peer."""
    own = [f for f in failures if f.code != EXIT_PEER_LOST]
    return (own or failures)[0]


def run_local(
    command: list[str],
    num_procs: int,
    master_port: int,
    env: dict[str, str],
    log_dir: str | None,
    where: Callable[[], str] = lambda: "",
) -> int:
    """Run `command` as ranks 0..num_procs-1 on this host; returns the exit code for cap-train.
    `where()` says, once a rank failed, where the run stands (cap_train.watch.resume_hint_from)."""
    procs = []
    base = {
        **env,
        "WORLD_SIZE": str(num_procs),
        "LOCAL_SIZE": str(num_procs),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(master_port),
        "CROSS_RANK": "0",
        "CROSS_SIZE": "1",
        "CAP_LAUNCHER_PID": str(os.getpid()),  # workers die with this process (die_with_parent)
    }
    try:
        for rank in range(num_procs):
            procs.append(
                subprocess.Popen(
                    command, env={**base, "RANK": str(rank), "LOCAL_RANK": str(rank)}, stdin=subprocess.DEVNULL
                )
            )
        return _watch(procs, log_dir, where)
    except BaseException:  # Ctrl-C, SIGTERM (SystemExit) or an error here: never leave workers behind
        _stop(procs)
        raise


def _watch(procs: list[subprocess.Popen], log_dir: str | None, where: Callable[[], str]) -> int:
    failures: list[Failure] = []
    settle_until = None
    while True:
        running = False
        for rank, p in enumerate(procs):
            code = p.poll()
            if code is None:
                running = True
            elif code != 0 and all(f.rank != rank for f in failures):
                failures.append(Failure(rank, p.pid, code))
        if failures:
            if _cause(failures).code == EXIT_PEER_LOST and running:
                settle_until = settle_until or time.monotonic() + SETTLE_S
                if time.monotonic() < settle_until:
                    time.sleep(POLL_S)
                    continue
            _stop(procs)
            for rank, p in enumerate(procs):  # collect what the stop revealed, for the record
                if p.returncode not in (0, None) and all(f.rank != rank for f in failures):
                    failures.append(Failure(rank, p.pid, p.returncode))
            return _report(_cause(failures), log_dir, len(procs), where)
        if not running:
            return 0
        time.sleep(POLL_S)


def _stop(procs: list[subprocess.Popen]) -> None:
    alive = [p for p in procs if p.poll() is None]
    for p in alive:
        try:
            p.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + GRACE_S
    for p in alive:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _report(cause: Failure, log_dir: str | None, num_procs: int, where: Callable[[], str]) -> int:
    stands = where()
    done = ("stopped the other ranks" if num_procs > 1 else "stopped") + (f" {stands}" if stands else "")
    logs = f"; full output of every rank: {log_dir}" if log_dir else ""
    if cause.code in (EXIT_CRASH, EXIT_USER, EXIT_PEER_NAMED):  # the rank printed its own line already
        return cause.code
    print(f"cap-train: {cause.describe()}; {done}{logs}", file=sys.stderr, flush=True)
    return 128 - cause.code if cause.code < 0 else cause.code


def run_hostfile(command: list[str], env: dict[str, str], log_dir: str, where: Callable[[], str]) -> int:
    """Run DeepSpeed's multi-node launcher; say in one line how the run ended when it failed.

    Ctrl-C reaches every process of the terminal's group (the launcher stops the ranks on every
    node); here it is only noted, so that the run is reported as interrupted, not as a failed worker."""
    interrupted = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: interrupted.append(True))
    try:
        proc = subprocess.Popen(command, env=env)
        while True:
            try:
                code = proc.wait()
                break
            except KeyboardInterrupt:  # a handler installed by someone else
                interrupted.append(True)
    finally:
        signal.signal(signal.SIGINT, previous)
    stands = where()
    if interrupted:
        print(f"cap-train: interrupted (Ctrl-C); every rank stopped {stands}; logs: {log_dir}", file=sys.stderr)
        return 130
    if code in (EXIT_CRASH, EXIT_USER, EXIT_PEER_NAMED):  # a rank printed its own line
        print(f"cap-train: the run stopped {stands}; every rank's output: {log_dir}", file=sys.stderr)
    elif code:
        print(
            f"cap-train: a rank failed (DeepSpeed's launcher exited with code {code}; its message is above); "
            f"every rank stopped {stands}; every rank's output: {log_dir}",
            file=sys.stderr,
        )
    return code


# Variables every node of a multi-node run needs as this shell has them: cap's own, the libraries'
# (HF hub/cache, tokenizers, Triton, torch, OpenMP/MKL threads, gloo, bitsandbytes, CUDA except
# CUDA_VISIBLE_DEVICES, which DeepSpeed sets per node from the hostfile), and the loader path.
# DeepSpeed itself forwards only NCCL*, PYTHON*, UCX*, MV2*, MLFLOW*.
FORWARD_PREFIXES = (
    "CAP_",
    "HF_",
    "TRANSFORMERS_",
    "TOKENIZERS_",
    "TRITON_",
    "TORCH",
    "PYTORCH_",
    "OMP_",
    "MKL_",
    "GLOO_",
    "BNB_",
    "CUDA_",
    "DS_ACCELERATOR",
    "LD_LIBRARY_PATH",
    "MASTER_ADDR",  # for MPI launchers, whose ranks find the master only here (cap_train.external)
    "MASTER_PORT",
)
NOT_FORWARDED = {"CUDA_VISIBLE_DEVICES", "DS_ENV_FILE"}


def forward_environment(env: dict[str, str], path: Path) -> list[str]:
    """Write DeepSpeed's environment file for a multi-node launch and point env's DS_ENV_FILE at it.

    It holds the FORWARD_PREFIXES variables of `env`, then the lines of the file(s) DeepSpeed would
    have read itself (~/.deepspeed_env, ./.deepspeed_env, or the user's DS_ENV_FILE), which win.
    DeepSpeed puts each value into a shell `export` in double quotes, so a value with a quote, $,
    backtick, backslash or newline cannot travel: those names are returned, not written."""
    lines, skipped = [], []
    for key in sorted(env):
        if key in NOT_FORWARDED or not key.startswith(FORWARD_PREFIXES):
            continue
        if any(c in env[key] for c in '"$`\\\n'):
            skipped.append(key)
        else:
            lines.append(f"{key}={env[key]}")
    name = env.get("DS_ENV_FILE", ".deepspeed_env")
    for folder in (Path.home(), Path(".")):
        user_file = folder / name
        if user_file.is_file():
            lines += [line for line in user_file.read_text().splitlines() if "=" in line]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))
    env["DS_ENV_FILE"] = str(path.resolve())
    return skipped
