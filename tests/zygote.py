"""Start `cap-train` without paying for its imports each time.

A tiny run on two cores spends ~5 of its ~7 s importing torch, DeepSpeed, transformers and
torch-optimi (which imports triton and torch._inductor); the suite starts ~120 of them. A zygote is
a process that has imported what cap-train's launcher and workers import, and nothing else has run
in it; for each run it forks a child that is the real `python -m cap_train.cli ARGS` (click, the
config checks, the run lock, the log folder, cap_train.launch.run_local) in the run's working
directory, environment and session, with stdout and stderr in the files given. That launcher starts
its workers as forks of itself running `cap_train.worker.main(ARGS)` in the environment run_local
gives them, instead of `python -u -m cap_train.worker ARGS`: every run and every rank is its own
process, as in a user's run, and only the start-up differs.

Variables read when a library is imported (the CPU's instruction set for oneDNN and ATen, OpenMP's
threads, the accelerator) are fixed per zygote: `Zygote.get(env)` keeps one per distinct set.
Tests that are about processes themselves (a worker found by its command line, torchrun, srun, the
launcher's first line) start cap-train as a plain subprocess instead.

Protocol: the test writes one JSON request per line to the zygote's stdin ({argv, env, cwd, stdout,
stderr}); the zygote answers `start <pid>` and, when that child ends, `exit <pid> <code>` (Popen's
returncode: negative for a signal).
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import threading
from pathlib import Path

IMPORT_TIME = ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "DS_ACCELERATOR")
IMPORT_TIME += ("TRITON_INTERPRET", "PYTHONHASHSEED")


# ---------------------------------------------------------------- inside the zygote
def _preload() -> None:
    import deepspeed  # noqa: F401
    import deepspeed.pipe  # noqa: F401
    import torch.utils.tensorboard  # noqa: F401
    import transformers
    from transformers import AutoConfig, AutoTokenizer  # noqa: F401

    import cap_train.cli  # noqa: F401
    import cap_train.worker  # noqa: F401

    transformers.LlamaForCausalLM  # noqa: B018 - the tiny models' family; others load in the run


def _resident_file_pages() -> list[int]:
    """Addresses of the pages of this process's readable file mappings (shared libraries, .pyc
    files) that are resident in its page tables. A fork copies the page tables of anonymous memory
    but not of file mappings, so a forked worker's resident size, which cap-train reports
    (memory/peak_rss_gib, held to --plan), would lack the libraries' pages that a worker started
    afresh maps while it imports them: the worker touches these pages first."""
    page = os.sysconf("SC_PAGE_SIZE")
    regions = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 6 and fields[5].startswith("/") and fields[1].startswith("r"):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                regions.append((start, end))
    present = []
    with open("/proc/self/pagemap", "rb") as pagemap:
        for start, end in regions:
            pagemap.seek(start // page * 8)
            entries = pagemap.read((end - start) // page * 8)
            for i in range(len(entries) // 8):
                if entries[8 * i + 7] & 0x80:  # bit 63: present
                    present.append(start + i * page)
    return present


_RESIDENT: list[int] = []


def _touch(addresses: list[int]) -> None:
    import ctypes

    for address in addresses:
        ctypes.string_at(address, 1)


class _ForkedWorker:
    """What cap_train.launch.run_local needs of subprocess.Popen, for a worker forked from the launcher."""

    def __init__(self, command: list[str], env: dict[str, str], stdin=None):
        assert command[1:4] == ["-u", "-m", "cap_train.worker"], command
        self.args, self.returncode = command, None
        sys.stdout.flush()
        sys.stderr.flush()
        self.pid = os.fork()
        if self.pid == 0:
            _become(env)
            _touch(_RESIDENT)

            def body():
                import cap_train.worker

                sys.argv = [cap_train.worker.__file__, *command[4:]]
                cap_train.worker.main(command[4:])

            _run_and_exit(body)

    def poll(self):
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None):
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.args, timeout)
            time.sleep(0.02)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        import signal

        self.send_signal(signal.SIGKILL)


def _popen(command, *args, **kwargs):
    """subprocess.Popen for cap_train.launch: its workers are forks; anything else starts as usual."""
    if isinstance(command, list) and command[:1] == [sys.executable] and "cap_train.worker" in command[:4]:
        return _ForkedWorker(command, kwargs.get("env") or dict(os.environ))
    return subprocess.Popen(command, *args, **kwargs)


def _become(env: dict[str, str], cwd: str | None = None, streams: tuple[str | None, str] | None = None) -> None:
    """In a fresh fork: this environment and working directory, stdin from /dev/null, and stdout
    (/dev/null when None) and stderr into the files `streams` names (else kept)."""
    os.environ.clear()
    os.environ.update(env)
    if cwd is not None:
        os.chdir(cwd)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    if streams is not None:
        for fd, path in zip((1, 2), streams):
            target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666) if path else os.dup(null)
            os.dup2(target, fd)
            os.close(target)
    os.close(null)


def _run_and_exit(body) -> None:
    """Run `body` as a process's main program would, then end this fork with its exit code."""
    import atexit

    code = 0
    try:
        body()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, int) and e.code is not None:
            print(e.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - as the interpreter would: the traceback, exit code 1
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        try:
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _serve() -> None:
    _preload()
    _RESIDENT[:] = _resident_file_pages()
    assert threading.active_count() == 1, threading.enumerate()  # a fork keeps only the calling thread
    children: set[int] = set()
    requests = sys.stdin.buffer
    while True:
        ready, _, _ = select.select([requests], [], [], 0.05)
        if ready:
            line = requests.readline()
            if not line:  # the test session ended: the runs go on until they end or are killed
                return
            req = json.loads(line)
            sys.stdout.flush()
            pid = os.fork()
            if pid == 0:
                _become(req["env"], req["cwd"], (req["stdout"], req["stderr"]))
                os.setsid()  # as start_new_session=True: the test stops the run by its process group
                sys.argv = ["cap-train", *req["argv"]]

                def body():
                    import cap_train.cli
                    import cap_train.launch

                    cap_train.launch.subprocess = _SubprocessWithForkedWorkers
                    cap_train.cli.main(req["argv"], prog_name="cap-train")

                _run_and_exit(body)
            children.add(pid)
            print(f"start {pid}", flush=True)
        for pid in list(children):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                children.discard(pid)
                print(f"exit {pid} {os.waitstatus_to_exitcode(status)}", flush=True)


class _SubprocessWithForkedWorkers:
    """The `subprocess` module as cap_train.launch sees it in a zygote's child."""

    Popen = staticmethod(_popen)
    TimeoutExpired = subprocess.TimeoutExpired
    DEVNULL = subprocess.DEVNULL
    PIPE = subprocess.PIPE


# ---------------------------------------------------------------- in the test process
class Zygote:
    _started: dict[tuple, Zygote] = {}
    _lock = threading.Lock()

    @classmethod
    def get(cls, env: dict[str, str]) -> Zygote:
        """The zygote for env's import-time variables (started on first use, kept for the session)."""
        key = tuple(env.get(k) for k in IMPORT_TIME)
        with cls._lock:
            if key not in cls._started or cls._started[key].proc.poll() is not None:
                cls._started[key] = cls(env)
            return cls._started[key]

    def __init__(self, env: dict[str, str]):
        root = Path(__file__).resolve().parents[1]
        self.proc = subprocess.Popen(
            [sys.executable, "-u", "-m", "tests.zygote"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env={**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))},
            cwd=root,
            text=True,
            start_new_session=True,
        )
        self.codes: dict[int, int] = {}
        self.changed = threading.Condition()
        self.started: list[int] = []
        threading.Thread(target=self._read, name="zygote-reader", daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            what, pid, *code = line.split()
            with self.changed:
                if what == "start":
                    self.started.append(int(pid))
                else:
                    self.codes[int(pid)] = int(code[0])
                self.changed.notify_all()
        with self.changed:
            self.changed.notify_all()

    def start(self, argv: list[str], env: dict[str, str], stdout: Path | None, stderr: Path) -> Run:
        """Start `cap-train ARGV` as a fork of this zygote; the run's stderr (and stdout) go to these files."""
        request = dict(argv=argv, env=env, cwd=os.getcwd(), stdout=stdout and str(stdout), stderr=str(stderr))
        with self.changed:
            before = len(self.started)
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            while len(self.started) == before:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"the zygote exited with code {self.proc.returncode}")
                self.changed.wait(1.0)
            return Run(self, self.started[before], argv)


class Run:
    """What the tests use of subprocess.Popen, for a run forked by a zygote (not this process's child)."""

    def __init__(self, zygote: Zygote, pid: int, argv: list[str]):
        self.zygote, self.pid, self.args = zygote, pid, argv

    @property
    def returncode(self) -> int | None:
        return self.zygote.codes.get(self.pid)

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        with self.zygote.changed:
            if not self.zygote.changed.wait_for(
                lambda: self.pid in self.zygote.codes or self.zygote.proc.poll() is not None, timeout
            ):
                raise subprocess.TimeoutExpired(self.args, timeout)
        if self.pid not in self.zygote.codes:
            raise RuntimeError("the zygote exited before the run ended")
        return self.returncode


if __name__ == "__main__":
    _serve()
