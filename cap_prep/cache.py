"""Where a prepared dataset lives, and how it gets there safely (one writer, atomic publish).

Fingerprint: sha256 over the format version, the prep-relevant config keys, the content of the
tokenizer files in model_dir, and each input file's resolved path, size and sha256 of its content.
Content hashes are remembered in `<prepared_dir>/.file-hashes.json` under (path, size, mtime_ns,
inode), so an unchanged file is not read again; the fingerprint itself depends only on content,
so every node computes the same folder name for the same files.

Building: the builder holds `<prepared_dir>/<fingerprint>.lock`, created with O_CREAT|O_EXCL
(atomic on local filesystems and on NFSv3+), holding host, pid and a nonce; a heartbeat thread
touches it every HEARTBEAT_S seconds. It builds into `.tmp-<fingerprint>-<host>-<pid>-<nonce>/`
and renames that to `<fingerprint>/` once the manifest is written: a folder named by its
fingerprint is always complete. Others wait, polling for the manifest. A lock is stale when its
holder is a dead process on this host, or when it was not touched for STALE_AFTER_S seconds as
measured by the waiter's own clock (another host's crash); the waiter then removes it and builds.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

from cap_prep.shards import FORMAT_VERSION, MANIFEST
from cap_prep.sources import InputFile
from common.errors import CapError

HASH_CACHE = ".file-hashes.json"
HEARTBEAT_S = 5.0
STALE_AFTER_S = 120.0
POLL_S = 0.5
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model", "chat_template.jinja", "chat_template.json")


# ---------------------------------------------------------------- fingerprint
def prep_keys(cfg) -> dict:
    """The config keys that change the prepared tokens (and nothing else: not lr, epochs, ...)."""
    def plain(v):
        return list(v) if isinstance(v, tuple) else v
    return {
        "sequence_len": cfg.sequence_len, "sequence_prefix": plain(cfg.sequence_prefix),
        "mask_tokens": plain(cfg.mask_tokens), "drop_tails": cfg.drop_tails, "mix_datasets": cfg.mix_datasets,
        "max_sequences": cfg.max_sequences, "eval_fraction": cfg.eval_fraction, "seed": cfg.seed,
        "add_prefix_space": cfg.add_prefix_space,
        "datasets": [{"control_class": d.control_class, "document_suffix": plain(d.document_suffix)}
                     for d in cfg.datasets],
    }


def sha256_file(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError as e:
        raise CapError(f"{path}: cannot read ({e.strerror})") from None


def tokenizer_hashes(model_dir: Path) -> dict[str, str]:
    """sha256 of each tokenizer file present in model_dir."""
    return {name: sha256_file(model_dir / name) for name in TOKENIZER_FILES if (model_dir / name).is_file()}


class FileHashes:
    """Content hashes of input files, remembered across runs by (path, size, mtime_ns, inode)."""

    def __init__(self, root: Path):
        self.path = root / HASH_CACHE
        try:
            self.known = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.known = {}
        self.changed = False

    def digest(self, f: InputFile) -> str:
        stamp = [f.size, f.mtime_ns, f.inode]
        entry = self.known.get(str(f.path))
        if entry and entry[:3] == stamp:
            return entry[3]
        digest = sha256_file(f.path)
        self.known[str(f.path)] = stamp + [digest]
        self.changed = True
        return digest

    def save(self) -> None:
        """Merge into the file on disk (best effort: it is only a cache)."""
        if not self.changed or not self.path.parent.is_dir():
            return
        try:
            on_disk = json.loads(self.path.read_text())
        except (OSError, ValueError):
            on_disk = {}
        on_disk.update(self.known)
        tmp = self.path.with_name(f"{HASH_CACHE}.{os.getpid()}.{secrets.token_hex(4)}")
        try:
            tmp.write_text(json.dumps(on_disk))
            os.replace(tmp, self.path)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()


def fingerprint(cfg, inputs: list[list[InputFile]], hashes: FileHashes) -> str:
    """The folder name of the prepared dataset for `cfg` and its matched input files."""
    record = {
        "format_version": FORMAT_VERSION,
        "prep": prep_keys(cfg),
        "tokenizer": tokenizer_hashes(cfg.model_dir),
        "inputs": [[[str(f.path), f.size, hashes.digest(f)] for f in files] for files in inputs],
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:20]


def is_complete(folder: Path) -> bool:
    """True for a published folder of this format: manifest written (last) and every shard at its size."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        if manifest.get("format_version") != FORMAT_VERSION:
            return False
        shards = [s for split in manifest["splits"].values() for s in split["shards"]]
        return all((folder / s["file"]).stat().st_size == s["bytes"] for s in shards)
    except (OSError, ValueError, KeyError, TypeError):
        return False


# ---------------------------------------------------------------- lock
class BuildLock:
    """An O_EXCL lock file with heartbeat; see the module docstring for the stale-lock rules."""

    def __init__(self, path: Path):
        self.path = path
        self.host, self.pid, self.nonce = socket.gethostname(), os.getpid(), secrets.token_hex(6)
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        self._seen: tuple[str, float] | None = None   # (content, waiter clock when it last changed)
        self.held = False

    @property
    def owner(self) -> str:
        return f"{self.host}-{self.pid}-{self.nonce}"

    def try_acquire(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump({"host": self.host, "pid": self.pid, "nonce": self.nonce, "time": time.time()}, f)
        self.held = True
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, daemon=True, name="cap-prep-lock")
        self._beat.start()
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

    def holder(self) -> str:
        """Who holds the lock, for messages."""
        info = self._read()
        return f"pid {info.get('pid')} on {info.get('host')}" if info else "another process"

    def _read(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def break_if_stale(self) -> bool:
        """Remove the lock if its holder is gone; True if it was removed."""
        try:
            content, mtime = self.path.read_text(), self.path.stat().st_mtime_ns
        except OSError:
            return False
        now = time.monotonic()
        state = f"{content}|{mtime}"
        if self._seen is None or self._seen[0] != state:
            self._seen = (state, now)
        try:
            info = json.loads(content)
        except ValueError:
            info = {}
        dead_here = info.get("host") == self.host and not _alive(info.get("pid"))
        silent = now - self._seen[1] > STALE_AFTER_S
        if not (dead_here or silent):
            return False
        with contextlib.suppress(OSError):
            if self.path.read_text() == content:   # still the lock we judged stale
                self.path.unlink()
                self._seen = None
                return True
        return False


def _alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------- build folder
def _make_dirs(path: Path) -> list[Path]:
    """mkdir -p; returns the folders it created, outermost first."""
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    path.mkdir(parents=True, exist_ok=True)
    return missing[::-1]


@contextlib.contextmanager
def build_folder(root: Path, fp: str, force: bool, say: Callable[[str], None]) -> Iterator[Path | None]:
    """Hold the lock for `fp` and yield a fresh temp folder to build in, published on success.

    Yields None when another process published the folder while this one waited (and not force).
    On any error the temp folder and the lock are removed, and so are folders this call created:
    nothing is left behind.
    """
    final = root / fp
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
            shutil.rmtree(leftover, ignore_errors=True)   # from builders that died; we hold the lock
        tmp = root / f".tmp-{fp}-{lock.owner}"
        tmp.mkdir()
        yield tmp
        publish(tmp, final, lock.owner)
        tmp = None
        ok = True
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if lock.held:
            lock.release()
        if not ok:
            for d in reversed(made):
                with contextlib.suppress(OSError):
                    d.rmdir()


def _acquire(lock: BuildLock, final: Path, force: bool, say: Callable[[str], None]) -> bool:
    """Take the lock (True), or return False once another process has published `final`."""
    waiting = False
    while not lock.try_acquire():
        if not force and is_complete(final):
            say(f"cap-prep: {final} was built by another process; reusing it")
            return False
        if lock.break_if_stale():
            say(f"cap-prep: removed the stale lock {lock.path}")
            continue
        if not waiting:
            say(f"cap-prep: waiting for {lock.holder()}, which is building {final}")
            waiting = True
        time.sleep(POLL_S)
    if not force and is_complete(final):      # published between our first check and the lock
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
