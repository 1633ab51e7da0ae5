"""Checkpoints that are complete or absent, never half-written.

Layout: <output_dir>/checkpoints/step00000123/
    ds/…                 DeepSpeed's model + optimizer state (trainable parameters only)
    rng-rank<r>.pt       each rank's torch / numpy / python RNG states
    state.json           step, epoch, step within epoch, tokens seen — written last
A checkpoint is built in `.tmp-step…` and renamed into place by rank 0 after every rank has
written its part, so a kill -9 at any moment leaves the previous complete checkpoint intact.
Old checkpoints beyond max_checkpoints are first renamed to `.trash-…`, then deleted.
"""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from common.files import write_json_atomic

STATE = "state.json"


class Checkpoints:
    """The checkpoints folder of one run."""

    def __init__(self, output_dir: Path, max_checkpoints: int):
        self.root = Path(output_dir) / "checkpoints"
        self.max_checkpoints = max_checkpoints

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
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
        for old in self.complete()[: -self.max_checkpoints]:
            trash = self.root / f".trash-{old.name}"
            old.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)
        self.clean_stale()
        return final


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_rng(folder: Path, rank: int) -> None:
    tmp = folder / f"rng-rank{rank}.pt.tmp"
    torch.save(rng_state(), tmp)
    os.replace(tmp, folder / f"rng-rank{rank}.pt")


def load_rng(folder: Path, rank: int) -> None:
    set_rng_state(torch.load(folder / f"rng-rank{rank}.pt", weights_only=False))
