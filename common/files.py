"""Durable file writes shared by the stages: fsync, and JSON written whole or not at all."""
from __future__ import annotations

import json
import os
from pathlib import Path


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
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    write_json(tmp, obj, **dump_kwargs)
    os.replace(tmp, path)
