"""Checkpoints that are complete or absent, never half-written, and checked before they are used.

Layout: <output_dir>/checkpoints/step00000123/
    trainable-stage<s>.safetensors   each stage's trainable weights and Adam state, by parameter name
    rng-rank<r>.safetensors          each rank's RNG states (cap_train/train_state.py)
    state.json                       written last: the position (step, epoch, step within epoch,
                                     tokens, global batch), the config the run had, the prepared
                                     data's fingerprint, the topology, the model's shape, and the
                                     size and sha256 of every other file
Format 2 (older cap) held DeepSpeed's per-rank state under ds/ and pickled RNG states; it still
resumes, on the topology that wrote it.
A checkpoint is built in `.tmp-step…` and renamed into place by rank 0 after every rank has
written its part, so a kill -9 at any moment leaves the previous complete checkpoint intact.
Old checkpoints beyond max_checkpoints are first renamed to `.trash-…`, then deleted.

Resume takes the newest checkpoint whose state.json reads and whose files match their recorded
sizes and sha256; a damaged one is renamed `.damaged-step…` (kept for inspection, said in one
line) and the one before it is tried.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from cap_common.files import write_json_atomic

STATE = "state.json"
FORMAT = 3


class Checkpoints:
    """The checkpoints folder of one run."""

    def __init__(self, output_dir: Path, max_checkpoints: int):
        self.root = Path(output_dir) / "checkpoints"
        self.max_checkpoints = max_checkpoints

    def complete(self) -> list[Path]:
        """Checkpoints with a state.json (published), oldest first."""
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.glob("step*") if (p / STATE).is_file())

    def newest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None

    def tmp_dir(self, step: int) -> Path:
        return self.root / f".tmp-step{step:08d}"

    def clean_stale(self) -> None:
        """Rank 0 at start: remove leftovers of interrupted writes and deletions."""
        if self.root.is_dir():
            for p in list(self.root.glob(".tmp-*")) + list(self.root.glob(".trash-*")):
                shutil.rmtree(p, ignore_errors=True)

    def publish(self, step: int, state: dict) -> Path:
        """Rank 0, after all ranks wrote into tmp_dir(step): state.json, rename, prune."""
        tmp = self.tmp_dir(step)
        write_json_atomic(tmp / STATE, state)
        final = self.root / f"step{step:08d}"
        if final.exists():  # re-reaching a step after a resume: replace the old copy
            final.rename(self.root / f".trash-{final.name}")
        os.replace(tmp, final)
        for old in self.complete()[: -self.max_checkpoints] if self.max_checkpoints > 0 else []:
            trash = self.root / f".trash-{old.name}"
            old.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)
        self.clean_stale()
        return final

    def set_aside(self, path: Path) -> Path:
        """Move a damaged checkpoint out of the way (hidden, kept for inspection)."""
        target = self.root / f".damaged-{path.name}"
        shutil.rmtree(target, ignore_errors=True)
        path.rename(target)
        return target


# ---------------------------------------------------------------- checksums
def checkpoint_files(folder: Path) -> list[str]:
    """Every file of a checkpoint folder except state.json, as sorted relative paths."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != STATE)


def file_record(path: Path) -> dict:
    """{"bytes": size, "sha256": hex digest} of one file."""
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return {"bytes": path.stat().st_size, "sha256": digest}


def read_state(folder: Path) -> dict:
    """state.json of a checkpoint; ValueError (with the reason) when it is missing or unreadable."""
    try:
        state = json.loads((folder / STATE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{STATE} is unreadable ({e})") from None
    if not isinstance(state, dict) or not all(
        isinstance(state.get(k), int) for k in ("step", "epoch", "step_in_epoch", "tokens")
    ):
        raise ValueError(f"{STATE} lacks the position (step, epoch, step_in_epoch, tokens)")
    return state


def damage(folder: Path, state: dict) -> str | None:
    """Why the checkpoint's files do not match state.json's record (None: they all match)."""
    files = state.get("files")
    if not isinstance(files, dict) or not files:
        return None if state.get("format", 1) < 2 else f"{STATE} records no files"
    for name, want in sorted(files.items()):
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != want.get("bytes"):
            return f"{name} has {size} bytes, {want.get('bytes')} were written"
        try:
            got = file_record(path)["sha256"]
        except OSError as e:
            return f"{name} is unreadable ({e.strerror})"
        if got != want.get("sha256"):
            return f"{name} does not match its sha256 (its content changed after it was written)"
    return None


@dataclass
class Chosen:
    path: Path
    state: dict


def choose(ckpts: Checkpoints, say: Callable[[str], None]) -> Chosen | None:
    """The newest checkpoint that reads and verifies; damaged ones are set aside with one line each."""
    for path in reversed(ckpts.complete()):
        try:
            state = read_state(path)
            problem = damage(path, state)
        except ValueError as e:
            problem = str(e)
        if problem is None:
            return Chosen(path, state)
        moved = ckpts.set_aside(path)
        say(
            f"cap-train: checkpoint {path.name} is damaged ({problem}); moved it to {moved.name} and "
            f"trying the one before it"
        )
    return None


# ---------------------------------------------------------------- format 2 (cap before checkpoint format 3)
def load_legacy_rng(folder: Path, rank: int) -> None:
    """Format-2 checkpoints kept each rank's RNG states in a torch pickle (cap wrote them itself)."""
    import numpy as np
    import torch

    state = torch.load(folder / f"rng-rank{rank}.pt", weights_only=False)
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_initialized():
        torch.cuda.set_rng_state_all(state["cuda"])
