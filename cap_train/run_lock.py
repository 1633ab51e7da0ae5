"""One cap-train run per output_dir.

The launcher holds `<output_dir>/.cap-train.lock` from before it writes anything until it exits:
cap-prep's lock file (cap_prep/lock.py: host, pid, nonce and time, never seen half written, a
heartbeat every few seconds). A second run into the same output_dir stops in one line naming the
run that holds it. A lock whose run is gone is taken over, with a note:
  - at once when its pid is not running on this host (a run killed with SIGKILL, a crashed node
    that came back), or when it is empty or not a lock;
  - after STALE_AFTER_S without a heartbeat when it is another host's (the run says that it waits,
    and stops as soon as a heartbeat shows that the other run is alive).
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Callable, Iterator

from cap_common.errors import CapError
from cap_common.files import user_os_errors
from cap_prep.lock import POLL_S, STALE_AFTER_S, BuildLock

LOCK_NAME = ".cap-train.lock"


@contextlib.contextmanager
def one_run(output_dir: Path, say: Callable[[str], None]) -> Iterator[None]:
    """Hold output_dir's run lock for the block (creating output_dir if needed)."""
    with user_os_errors(output_dir, "cannot create the folder"):
        output_dir.mkdir(parents=True, exist_ok=True)
    lock = BuildLock(output_dir / LOCK_NAME)
    _acquire(lock, output_dir, say)
    try:
        yield
    finally:
        lock.release()


def _acquire(lock: BuildLock, output_dir: Path, say: Callable[[str], None]) -> None:
    waited_since, seen = None, None
    while not lock.try_acquire():
        why = lock.break_if_stale()
        if why:
            say(f"cap-train: took over the lock of a run that is gone ({why}): {lock.path}")
            continue
        info, state = lock.info(), _state(lock.path)
        holder = lock.holder()
        alive = seen is not None and state != seen  # its heartbeat moved the lock
        if (info is not None and info["host"] == lock.host) or alive:  # a live pid here: not stale
            raise CapError(
                f"{output_dir}: another cap-train run is writing here ({holder}); wait for it to end, or "
                "choose another output_dir"
            )
        if waited_since is None:
            waited_since, seen = time.monotonic(), state
            say(
                f"cap-train: {lock.path} is held by {holder}; waiting up to {STALE_AFTER_S:.0f} s for its "
                "heartbeat (a run that is gone stops refreshing it)"
            )
        time.sleep(POLL_S)


def _state(path: Path) -> tuple | None:
    try:
        st = path.stat()
        return st.st_mtime_ns, st.st_ino
    except OSError:
        return None
