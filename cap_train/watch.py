"""The ranks watch each other, so that a rank that stops answering ends the run in one line.

A collective whose peer died, was stopped (SIGSTOP, a paused VM) or lost its network waits until its
timeout (CAP_COLLECTIVE_TIMEOUT_MIN), and the error it then raises names no rank. So every rank
beats: every BEAT_S seconds it adds 1 to its counter `beat/<r>` in the store the ranks rendezvoused
through. Rank 0 watches every rank's counter, the others watch rank 0's. A watched counter that has
not moved for the collective timeout means that rank stopped answering; the watcher (rank 0, or
rank 1 when rank 0 is the one) prints

    cap-train: rank R on HOST stopped answering (…); every rank stopped after step S; resume from …

tells the others through the store, and exits; they exit quietly. When a collective fails in the
main thread (`explain`), the same counters say why within a few beats: a rank that stopped with its
own error line (the others stay quiet), a rank whose counter stopped (named as above), or else a
failed collective between live ranks (rank 0 names the error).

Two threads: the beater talks to the store (a call can hang while the store's host is stopped); the
judge only reads the beater's record of when each watched counter last moved.
"""

from __future__ import annotations

import datetime
import json
import os
import secrets
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from cap_common.files import HOST
from cap_train.logs import EXIT_PEER_LOST, EXIT_PEER_NAMED

BEAT_S = 5.0
GONE_BEATS = 3  # after a failed collective: a counter still for this many beats marks the rank that stopped
# A watcher counts a rank's silence from the last beat it saw: up to one beat before the rank stopped, seen
# up to one poll later. So a rank paused for more than limit − LATE_S may have been given up by the others.
LATE_S = 2 * BEAT_S


def resume_hint(step: int, checkpoint: str | None) -> str:
    """Where a stopped run stands: its last completed step and the checkpoint to resume from."""
    where = f"after step {step}" if step else "before its first step"
    if checkpoint:
        return f"{where}; resume from {checkpoint} with --resume-from-checkpoint"
    return f"{where}; no checkpoint yet (a new run starts at step 0)"


@dataclass
class Progress:
    """What the trainer tells the watch: the last completed step and the newest checkpoint."""

    step: int = 0
    checkpoint: str | None = None


def resume_hint_from(output_dir: Path) -> str:
    """`resume_hint` read from a run's files: the last step in metrics.jsonl, the newest checkpoint."""
    from cap_train.checkpoint import Checkpoints

    step = 0
    try:
        with open(Path(output_dir) / "metrics.jsonl", "rb") as f:
            f.seek(max(0, f.seek(0, 2) - 65536))
            lines = f.read().decode(errors="replace").splitlines()
        step = int(json.loads(lines[-1])["step"]) if lines else 0
    except (OSError, ValueError, KeyError, IndexError):
        pass
    try:
        newest = Checkpoints(Path(output_dir), 0).newest()
    except OSError:
        newest = None
    return resume_hint(step, str(newest) if newest else None)


current: Watch | None = None  # this process's watch, once the process group is up


class Watch:
    """This rank's heartbeat and watcher (see the module docstring)."""

    def __init__(self, store, rank: int, hosts: list[str], limit_s: float, say: Callable[[str], None], log):
        self.store, self.rank, self.hosts, self.limit_s = store, rank, hosts, limit_s
        self.say, self.log = say, log  # a line for the user (console and log); a line for the log only
        self.watched = list(range(1, len(hosts))) if rank == 0 else [0]
        now = time.monotonic()
        self.moved = {r: now for r in self.watched}  # when each watched counter last moved (judge's clock)
        self.count = {r: -1 for r in self.watched}
        self.progress = Progress()
        self.ended: list[tuple[int, str]] = []  # ranks that stopped on their own: (rank, kind)
        self.stopped = ""  # the line of the rank that ended the run, once one did
        self.tick = now  # the judge's last look
        self.paused_s = 0.0  # this rank's own pause, when long enough that the others may have ended the run
        self.alive_since_pause: set[int] = set()  # watched ranks whose counter moved since that pause
        self._done = threading.Event()
        self._decided = threading.Lock()

    @classmethod
    def start(cls, say: Callable[[str], None], log: Callable[[str], None]) -> Watch | None:
        """Every rank, once the process group is up (None with one process)."""
        import torch.distributed as dist

        from cap_train import startup

        world = dist.get_world_size()
        if world == 1:
            return None
        hosts: list = [None] * world
        dist.all_gather_object(hosts, HOST)
        box = [secrets.token_hex(4)]
        dist.broadcast_object_list(box, src=0)
        try:
            client = dist.TCPStore(
                os.environ["MASTER_ADDR"],
                int(os.environ["MASTER_PORT"]),
                is_master=False,
                wait_for_workers=False,
                timeout=datetime.timedelta(seconds=60),
            )
        except (KeyError, ValueError, RuntimeError) as e:  # collectives still time out; only the names are lost
            log(f"cap-train: warning: no heartbeats (cannot reach the rendezvous store: {e})")
            return None
        store = dist.PrefixStore(f"cap-watch/{box[0]}/", client)
        watch = cls(store, dist.get_rank(), hosts, startup.collective_timeout().total_seconds(), say, log)
        threading.Thread(target=watch._beat, name="cap-beat", daemon=True).start()
        threading.Thread(target=watch._judge, name="cap-judge", daemon=True).start()
        return watch

    # ------------------------------------------------------------ threads
    def _beat(self) -> None:
        while not self._done.is_set():
            try:
                self.store.add(f"beat/{self.rank}", 1)
                for r in self.watched:
                    count = self.store.add(f"beat/{r}", 0)
                    if count != self.count[r] or self.store.add(f"done/{r}", 0):
                        self.count[r], self.moved[r] = count, time.monotonic()
                        self.alive_since_pause.add(r)
                if self.store.add("ended", 0):
                    self._read_ended()
            except Exception:  # noqa: BLE001 - the store's host is gone or cut off: the judge sees the silence
                pass
            self._done.wait(BEAT_S)

    def _judge(self) -> None:
        while not self._done.wait(BEAT_S / 2):
            self._check_own_pause()
            if self.stopped or any(kind == "error" for _, kind in self.ended):
                self._exit_quietly()
            silent = [r for r in self.watched if time.monotonic() - self.moved[r] > self.limit_s]
            if silent:
                self._decide(silent[0], f"no heartbeat for {self.limit_s:.0f} s")

    def _check_own_pause(self) -> None:
        """This process was itself stopped (SIGSTOP, a suspended VM) when the judge's clock jumped:
        past the limit the others have ended the run (quiet exit); a shorter pause starts every
        watched rank's silence afresh. Within LATE_S of the limit the others may have ended it too:
        a watched rank that is then silent before its counter moved again is not blamed (`_decide`)."""
        now = time.monotonic()
        paused, self.tick = now - self.tick, now
        if paused > self.limit_s:
            self.stopped = self.stopped or self._paused_line(paused)
            self._exit_quietly()
        if paused > GONE_BEATS * BEAT_S:
            if paused > self.limit_s - LATE_S:
                self.paused_s, self.alive_since_pause = paused, set()
            self.moved = {r: now for r in self.watched}

    @staticmethod
    def _paused_line(paused: float) -> str:
        return f"this rank was paused for {paused:.0f} s; the other ranks ended the run"

    def _read_ended(self) -> None:
        ended = []
        for r in range(len(self.hosts)):
            if r != self.rank and self.store.check([f"exit/{r}"]):
                ended.append((r, self.store.get(f"exit/{r}").decode()))
        self.ended = ended
        if self.store.check(["verdict"]):
            self.stopped = self.store.get("verdict").decode()

    # ------------------------------------------------------------ outcomes
    def _decide(self, rank: int, why: str) -> None:
        """`rank` stopped answering: one line (from rank 0, or rank 1 when rank 0 is the one), every rank ends."""
        if self.paused_s and rank not in self.alive_since_pause:
            self.stopped = self.stopped or self._paused_line(self.paused_s)
            self._exit_quietly()
        if not self._decided.acquire(blocking=False):
            return
        line = (
            f"cap-train: rank {rank} on {self.hosts[rank]} stopped answering ({why}: its process ended or "
            f"was stopped, or its network is down); every rank stopped "
            f"{resume_hint(self.progress.step, self.progress.checkpoint)}"
        )
        reporter = 1 if rank == 0 else 0
        if self.rank != reporter:
            self.log(line)
            self._exit(EXIT_PEER_LOST)
        self._report(line)

    def _report(self, line: str) -> None:
        """Say the run's one line, leave it in the store for the other ranks, and end (exit 4)."""
        self.say(line)
        self._publish("verdict", line)
        self._exit(EXIT_PEER_NAMED)

    def _publish(self, kind: str, verdict: str | None = None) -> None:
        """Tell the other ranks how this rank ends (`exit/<r>` = kind; and the run's verdict line),
        from a thread given BEAT_S: the store may hang, and then they find out by their own timeouts."""

        def tell():
            try:
                if verdict is not None:
                    self.store.set("verdict", verdict)
                self.store.set(f"exit/{self.rank}", kind)
                self.store.add("ended", 1)
            except Exception:  # noqa: BLE001
                pass

        teller = threading.Thread(target=tell, daemon=True)
        teller.start()
        teller.join(BEAT_S)

    def _exit_quietly(self) -> None:
        """End with exit 3 and a log line; never returns (another thread that decided first ends the process)."""
        if not self._decided.acquire(blocking=False):
            threading.Event().wait()
        self.log(f"cap-train: stopped (rank {self.rank} on {HOST}): {self.stopped or 'another rank failed'}")
        self._exit(EXIT_PEER_LOST)

    def _exit(self, code: int) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    # ------------------------------------------------------------ the main thread
    def failed(self) -> None:
        """This rank stops with its own error line: the others stop quietly when they notice."""
        self._done.set()
        self._publish("error")

    def explain(self, error: BaseException) -> None:
        """A collective failed (a lost peer or a timeout): within GONE_BEATS beats, name the rank that
        stopped answering, or stop quietly when another rank reports; else rank 0 names the error. Never returns.
        A dead rank's last beat may be seen up to LATE_S after the failure, and its silence counts from then."""
        deadline = time.monotonic() + GONE_BEATS * BEAT_S + LATE_S + BEAT_S
        while time.monotonic() < deadline:
            if time.monotonic() - self.tick > GONE_BEATS * BEAT_S:  # this rank was paused: the judge decides
                time.sleep(BEAT_S)
                continue
            if self.stopped or any(kind == "error" for _, kind in self.ended):
                self._exit_quietly()
            silent = [r for r in self.watched if time.monotonic() - self.moved[r] > GONE_BEATS * BEAT_S]
            if silent:
                self._decide(silent[0], "no heartbeat since a collective failed")
            time.sleep(BEAT_S / 5)
        if self.rank != 0:
            self._exit_quietly()
        if not self._decided.acquire(blocking=False):
            threading.Event().wait()  # the judge is ending this process with its own line
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        line = (
            f"cap-train: a collective failed on rank 0 on {HOST} while every rank still answered ({first}); "
            f"every rank stopped {resume_hint(self.progress.step, self.progress.checkpoint)}"
        )
        self._report(line)

    def finish(self) -> None:
        """A clean end: stop beating; watchers do not count this rank as silent."""
        self._done.set()
        try:
            self.store.add(f"done/{self.rank}", 1)
        except Exception:  # noqa: BLE001
            pass
