"""One builder per prepared folder: the lock file, its heartbeat and stale-lock rules, and the
atomic publish of the finished folder (cap_prep/cache.py names the folder).

Building: the builder holds `<prepared_dir>/<fingerprint>.lock`, a JSON file of host, pid, nonce
and time that is never seen empty or half written: it is written to a temporary file beside it and
hard-linked to the lock's name (atomic, fails if the name exists, also on NFS), then the temporary
is removed (on a filesystem without hard links: O_CREAT|O_EXCL and one write). A heartbeat thread
touches it every HEARTBEAT_S seconds. The builder works in `.tmp-<fingerprint>-<host>-<pid>-<nonce>/`
and renames that to `<fingerprint>/` once the manifest is written: a folder named by its
fingerprint is always complete. Others wait, polling for the manifest. A lock is stale, and the
waiter removes it and builds, when
  - it is empty, unreadable or not a JSON object with a host and a pid (no live builder writes
    such a lock; after INVALID_GRACE_S unchanged, for the O_EXCL fallback's instant between
    create and write),
  - its pid is not running and its host is this one, or
  - it was not touched for STALE_AFTER_S seconds as measured by the waiter's own clock (another
    host's crash, or a reused pid).
Every write error (disk full, permissions) is a CapError naming the path; the temp folder, the
lock and its temporary, and the folders this build created are removed.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

from cap_common.errors import CapError
from cap_common.files import HOST, pid_alive, remove_stale_temps, temp_name, user_os_errors
from cap_prep.cache import is_complete

HEARTBEAT_S = 5.0
STALE_AFTER_S = 120.0
INVALID_GRACE_S = 1.0
POLL_S = 0.5


_NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EXDEV}


class BuildLock:
    """A lock file created complete (temporary + hard link) with a heartbeat; see the module
    docstring for the stale-lock rules."""

    def __init__(self, path: Path):
        self.path = path
        self.host, self.pid, self.nonce = HOST, os.getpid(), secrets.token_hex(6)
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        self._seen: tuple[tuple, float] | None = None  # (what the lock looked like, waiter clock when first seen)
        self.held = False

    @property
    def owner(self) -> str:
        return f"{self.host}-{self.pid}-{self.nonce}"

    def try_acquire(self) -> bool:
        body = json.dumps({"host": self.host, "pid": self.pid, "nonce": self.nonce, "time": time.time()}).encode()
        tmp = self.path.with_name(temp_name(self.path.name))
        with user_os_errors(self.path, "cannot create the lock"):
            try:
                with open(tmp, "xb") as f:
                    f.write(body)
                if not self._link(tmp, body):
                    return False
            finally:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
        self.held = True
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, daemon=True, name="cap-prep-lock")
        self._beat.start()
        return True

    def _link(self, tmp: Path, body: bytes) -> bool:
        """Make `tmp` the lock; False if the lock exists."""
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        except OSError as e:
            if os.stat(tmp).st_nlink == 2:  # NFS: the reply to a link that was made got lost
                return True
            if e.errno not in _NO_HARD_LINKS:
                raise
        try:  # no hard links here: create exclusively, one write
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, body)
        except OSError:
            os.close(fd)
            os.unlink(self.path)
            raise
        os.close(fd)
        return True

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
            self._beat = None
        with contextlib.suppress(OSError):
            self.path.unlink()
        self.held = False

    def info(self) -> dict | None:
        """The lock's {"host", "pid", ...} as its holder wrote it; None when it is gone or not a lock."""
        try:
            return _lock_info(self.path.read_bytes())
        except OSError:
            return None

    def holder(self) -> str:
        """Who holds the lock, for messages."""
        info = self.info()
        return f"pid {info['pid']} on {info['host']}" if info else "another process"

    def break_if_stale(self) -> str | None:
        """Remove the lock if its holder is gone; returns why, or None if it was left alone."""
        try:
            content = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            content = e.strerror or str(e)  # unreadable: judged by its error, removed unread
            readable = False
        else:
            readable = True
        try:
            mtime = self.path.stat().st_mtime_ns
        except FileNotFoundError:
            return None
        except OSError:
            mtime = None
        now = time.monotonic()
        state = (readable, content, mtime)
        if self._seen is None or self._seen[0] != state:
            self._seen = (state, now)
        unchanged = now - self._seen[1]
        info = _lock_info(content) if readable else None
        if info is None:
            why = (
                "empty"
                if readable and not content.strip()
                else f"unreadable: {content}"
                if not readable
                else "not a cap lock file"
            )
            if unchanged < INVALID_GRACE_S:
                return None
        elif info["host"] == self.host and not pid_alive(info["pid"]):
            why = f"pid {info['pid']} is not running"
        elif unchanged > STALE_AFTER_S:
            why = f"pid {info['pid']} on {info['host']}: no heartbeat for {unchanged:.0f} s"
        else:
            return None
        try:
            if readable and self.path.read_bytes() != content:  # not the lock we judged
                return None
            self.path.unlink()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise CapError(f"{self.path}: cannot remove this stale lock ({why}; {e.strerror or e})") from None
        self._seen = None
        return why


def _lock_info(content: bytes) -> dict | None:
    """The lock's {"host": str, "pid": int, ...}, or None if it is not one."""
    try:
        info = json.loads(content)
    except ValueError:
        return None
    ok = isinstance(info, dict) and isinstance(info.get("host"), str) and isinstance(info.get("pid"), int)
    return info if ok else None


# ---------------------------------------------------------------- build folder
def _make_dirs(path: Path) -> list[Path]:
    """mkdir -p; returns the folders it created, outermost first (on an error: none left)."""
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    made = []
    try:
        for d in reversed(missing):
            try:
                d.mkdir()
                made.append(d)
            except FileExistsError:
                pass
    except OSError:
        _remove_dirs(made)
        raise
    return made


def _remove_dirs(made: list[Path]) -> None:
    for d in reversed(made):
        with contextlib.suppress(OSError):
            d.rmdir()


@contextlib.contextmanager
def build_folder(root: Path, fp: str, force: bool, say: Callable[[str], None]) -> Iterator[Path | None]:
    """Hold the lock for `fp` and yield a fresh temp folder to build in, published on success.

    Yields None when another process published the folder while this one waited (and not force).
    On any error the temp folder and the lock are removed, and so are folders this call created:
    nothing is left behind.
    """
    final = root / fp
    with user_os_errors(root, "cannot create the folder"):
        made = _make_dirs(root)
    lock = BuildLock(root / f"{fp}.lock")
    tmp = None
    ok = False
    try:
        if not _acquire(lock, final, force, say):
            ok = True
            yield None
            return
        for leftover in list(root.glob(f".tmp-{fp}-*")) + list(root.glob(f".old-{fp}-*")):
            shutil.rmtree(leftover, ignore_errors=True)  # from builders that died; we hold the lock
        remove_stale_temps(root, lock.path.name)  # lock temporaries of dead processes
        tmp = root / f".tmp-{fp}-{lock.owner}"
        with user_os_errors(tmp, "cannot create the folder"):
            tmp.mkdir()
        yield tmp
        with user_os_errors(final, "cannot publish the build"):
            publish(tmp, final, lock.owner)
        tmp = None
        ok = True
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if lock.held:
            lock.release()
        if not ok:
            _remove_dirs(made)


def _acquire(lock: BuildLock, final: Path, force: bool, say: Callable[[str], None]) -> bool:
    """Take the lock (True), or return False once another process has published `final`."""
    waiting = False
    while not lock.try_acquire():
        if not force and is_complete(final):
            say(f"cap-prep: {final} was built by another process; reusing it")
            return False
        why = lock.break_if_stale()
        if why:
            say(f"cap-prep: removed the stale lock {lock.path} ({why})")
            continue
        if not waiting:
            say(f"cap-prep: waiting for {lock.holder()}, which is building {final}")
            waiting = True
        time.sleep(POLL_S)
    if not force and is_complete(final):  # published between our first check and the lock
        lock.release()
        say(f"cap-prep: {final} was built by another process; reusing it")
        return False
    return True


def publish(tmp: Path, final: Path, owner: str) -> None:
    """Atomically make `tmp` the folder `final` (replacing an old one, as --force does)."""
    old = None
    if final.exists():
        old = final.with_name(f".old-{final.name}-{owner}")
        os.rename(final, old)
    os.rename(tmp, final)
    with contextlib.suppress(OSError):
        fd = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
