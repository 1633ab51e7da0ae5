"""Where cap-export writes: OUT is never an input, inside one or above one (`check_output`); it is
built under a temporary name beside it (owner recorded, stale ones of killed runs removed: see
cap_common.files) and renamed to OUT only when complete (`staged_output`); `folder_size` of the result.
Every user-facing problem is a one-line CapError naming the file.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

from cap_common.errors import CapError
from cap_common.files import HOST, make_temp_dir, remove_stale_temps, temp_name, user_os_errors
from cap_export import note


def _same(a: Path, b: Path) -> bool:
    if a == b:
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _touches(out: Path, source: Path) -> str | None:
    """How OUT relates to an input: 'is', 'lies inside' or 'contains' it (symlinks, `..` and hard
    links resolved); None when they are apart."""
    out, source = out.resolve(), source.resolve()
    if _same(out, source):
        return "is"
    if any(_same(parent, source) for parent in out.parents):
        return "lies inside"
    if any(_same(parent, out) for parent in source.parents):
        return "contains"
    return None


def check_output(out: Path, force: bool, is_file: bool = False, inputs: dict | None = None) -> None:
    """OUT may be written: it is not an input, inside one or above one (`inputs`: label → path,
    --force or not), and it is absent, an empty folder, or replaceable with --force."""
    out = Path(out)
    for label, source in (inputs or {}).items():
        how = source and _touches(out, Path(source))
        if how:
            raise CapError(
                f"{out}: OUT {how} the input {label} ({source}); cap-export never writes over or into "
                f"its inputs, choose another OUT"
            )
    if not out.exists():
        return
    if is_file and out.is_dir():
        raise CapError(f"{out}: is a folder; OUT must be a file path")
    if not is_file and not out.is_dir():
        raise CapError(f"{out}: exists and is not a folder")
    if out.is_dir() and not any(out.iterdir()):
        return
    if not force:
        raise CapError(f"{out}: exists and is not empty (pass --force to replace it)")


@contextlib.contextmanager
def temporary_folder(parent: Path, name: str) -> Iterator[Path]:
    """A new temporary folder for `parent/name` (common.files.make_temp_dir), deleted on exit, also
    on SIGTERM / Ctrl-C; the stale ones that killed processes of this host left are removed first."""
    parent = Path(parent)
    removed = remove_stale_temps(parent, name)
    if removed:
        note(
            f"removed {len(removed)} temporary folder(s) of {parent / name} left by killed runs: "
            f"{', '.join(p.name for p in removed)}"
        )
    tmp = None
    try:
        with user_os_errors(parent, "cannot create a temporary folder"):
            tmp = make_temp_dir(parent, name)
        yield tmp
    finally:
        # A signal between the mkdir and `tmp` being set leaves a folder only this process's name marks.
        mine = [tmp] if tmp is not None else parent.glob(f".{name}.tmp-{HOST}-{os.getpid()}-*")
        for folder in mine:
            shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def staged_output(out, force: bool, is_file: bool = False, inputs: dict | None = None) -> Iterator[Path]:
    """Yield a temporary path beside OUT (a folder, or a file inside a temporary folder); on success
    it is renamed to OUT, replacing what was there (checked by check_output, with `inputs`); on
    failure or a signal it is removed and OUT is left as it was. An OSError while writing is one line."""
    out = Path(out)
    check_output(out, force, is_file, inputs)
    with temporary_folder(out.parent, out.name) as tmp, user_os_errors(out, "cannot write"):
        yield tmp / out.name if is_file else tmp
        if is_file:
            os.replace(tmp / out.name, out)
            return
        old = None
        if out.exists():
            old = out.parent / temp_name(out.name)  # a stale temporary of OUT if we are killed now
            os.rename(out, old)
        try:
            os.rename(tmp, out)
        except BaseException:
            if old is not None:
                os.rename(old, out)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def folder_size(path: Path) -> int:
    """Bytes in `path`: a file's size, or the sum of the files under a folder."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
