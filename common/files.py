"""File-system helpers shared by the stages: durable writes, OS errors as one-line user errors,
temporary folders that follow the umask and that a later run can recognise as stale.

Temporary names: `temp_name(name)` = `.{name}.tmp-{host}-{pid}-{nonce}`. A temporary of this form
whose host is this machine and whose pid is not running was left by a killed process;
`remove_stale_temps(folder, name)` deletes those (and nothing a live process may still be writing).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import socket
from pathlib import Path
from typing import Iterator

from cap_common.errors import CapError

HOST = socket.gethostname()


def fsync(path: Path) -> None:
    """Flush a written file's data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, obj, **dump_kwargs) -> None:
    """Write `obj` as indented JSON (+ newline) and fsync it."""
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, **dump_kwargs)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def write_json_atomic(path: Path, obj, **dump_kwargs) -> None:
    """write_json to a temp name beside `path`, then rename: readers see the old file or the new one."""
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    try:
        write_json(tmp, obj, **dump_kwargs)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


# ---------------------------------------------------------------- OS errors
def os_error_message(e: OSError, path=None) -> str:
    """`<path>: <what failed>` for an OSError, naming `path` when the error itself names no file."""
    where = e.filename if e.filename is not None else path
    what = e.strerror or str(e)
    if e.filename2 is not None:
        return f"{e.filename} → {e.filename2}: {what}"
    return f"{where}: {what}" if where is not None else what


@contextlib.contextmanager
def user_os_errors(path, doing: str = "cannot write") -> Iterator[None]:
    """Turn an OSError raised inside the block (disk full, permission, read-only file system, ...)
    into a CapError `<path>: <doing> (<error>)`; the caller's cleanup still runs as it unwinds."""
    try:
        yield
    except OSError as e:
        where = e.filename if e.filename is not None else path
        if e.filename2 is not None:  # copy / rename: name both ends
            where = f"{e.filename} → {e.filename2}"
        raise CapError(f"{where}: {doing} ({e.strerror or e})") from None


# ---------------------------------------------------------------- processes
def pid_alive(pid) -> bool:
    """True if a process with this pid runs on this machine (or may: no permission to signal it)."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------- temporary folders
def umask() -> int:
    """The process's umask (read without changing it for longer than one call)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path: Path, directory: bool = True) -> None:
    """Give `path` the permissions a plain mkdir / open would have (mkdtemp makes folders 0700)."""
    os.chmod(path, (0o777 if directory else 0o666) & ~umask())


def temp_name(name: str) -> str:
    """`.{name}.tmp-{host}-{pid}-{nonce}`: a hidden temporary beside `name`, owner recorded."""
    return f".{name}.tmp-{HOST}-{os.getpid()}-{secrets.token_hex(4)}"


def make_temp_dir(parent: Path, name: str) -> Path:
    """A new, empty temporary folder beside `parent / name`, with umask permissions."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = parent / temp_name(name)
        try:
            tmp.mkdir()
            return tmp
        except FileExistsError:
            continue


def _temp_owner(tmp_name: str, name: str) -> tuple[str, int] | None:
    m = re.fullmatch(rf"\.{re.escape(name)}\.tmp-(.+)-(\d+)-[0-9a-f]+", tmp_name)
    return (m.group(1), int(m.group(2))) if m else None


def remove_stale_temps(parent: Path, name: str) -> list[Path]:
    """Delete the temporaries of `parent / name` left by dead processes of this host; returns them."""
    removed = []
    parent = Path(parent)
    if not parent.is_dir():
        return removed
    for path in parent.glob(f".{glob_escape(name)}.tmp-*"):
        owner = _temp_owner(path.name, name)
        if owner is None or owner[0] != HOST or pid_alive(owner[1]):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                path.unlink()
        removed.append(path)
    return removed


def glob_escape(name: str) -> str:
    """`name` with glob's special characters escaped."""
    return re.sub(r"([*?\[])", r"[\1]", name)
