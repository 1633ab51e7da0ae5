"""The order in which each data-parallel rank reads the training rows — a pure function of
(seed, epoch, rank), so a resumed run reads exactly what an uninterrupted one would.

Epoch e: a permutation of all N rows drawn from numpy's PCG64 seeded with (seed, e); rank k of D
takes rows perm[k::D]; each rank's list is cut to S = ⌊N / (D·R)⌋ whole steps of
R = micro_batch_size · gradient_accumulation_steps rows (the rest of the epoch is dropped and
reshuffled into the next one). The position saved in a checkpoint is (epoch, step within epoch).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np


@functools.lru_cache(maxsize=2)
def _permutation(n_rows: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.Generator(np.random.PCG64([seed, epoch])).permutation(n_rows)


@dataclass(frozen=True)
class TrainOrder:
    n_rows: int
    dp_rank: int
    dp_world: int
    seed: int
    micro_batch_size: int
    accumulation: int

    @property
    def rows_per_step(self) -> int:
        return self.micro_batch_size * self.accumulation

    @property
    def steps_per_epoch(self) -> int:
        return self.n_rows // (self.dp_world * self.rows_per_step)

    def rows(self, epoch: int) -> np.ndarray:
        """This rank's row indices for `epoch`, cut to whole steps: shape [steps, accumulation, micro_batch]."""
        perm = _permutation(self.n_rows, self.seed, epoch)
        mine = perm[self.dp_rank :: self.dp_world][: self.steps_per_epoch * self.rows_per_step]
        return mine.reshape(self.steps_per_epoch, self.accumulation, self.micro_batch_size)

    def micro_batches(self, epoch: int, start_step: int = 0):
        """Yield (step, row indices [micro_batch]) from `start_step` of `epoch` on."""
        rows = self.rows(epoch)
        for step in range(start_step, len(rows)):
            for micro in rows[step]:
                yield step, micro
