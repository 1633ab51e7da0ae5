"""The order in which the run reads the training rows — one global order, a pure function of
(seed, epoch), that every topology deals out the same way, so a resumed run reads exactly what an
uninterrupted one would, on any number of processes and stages.

Epoch e: a permutation of all N rows drawn from numpy's PCG64 seeded with (seed, e). Step s of the
epoch reads the G = D·R rows perm[s·G : (s+1)·G] (R = micro_batch_size · gradient_accumulation_steps
rows per data-parallel rank, D ranks); data-parallel rank k takes the k-th run of R of them. An
epoch is S = ⌊N / G⌋ whole steps (the rest is dropped and reshuffled into the next epoch). The
position saved in a checkpoint is (epoch, step within epoch); the stream of rows depends on G only,
so a resume keeps it when G stays the same, whatever D and the pipeline stages become.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np


@functools.lru_cache(maxsize=2)
def _permutation(n_rows: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.Generator(np.random.PCG64([seed, epoch])).permutation(n_rows)


def rows_per_global_step(micro_batch_size: int, accumulation: int, replicas: int) -> int:
    """The global batch G = micro_batch_size · gradient_accumulation_steps · data-parallel replicas."""
    return micro_batch_size * accumulation * replicas


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
    def global_batch(self) -> int:
        return rows_per_global_step(self.micro_batch_size, self.accumulation, self.dp_world)

    @property
    def steps_per_epoch(self) -> int:
        return self.n_rows // self.global_batch

    def global_rows(self, epoch: int) -> np.ndarray:
        """Every rank's rows of `epoch`, cut to whole steps: shape [steps, D, accumulation, micro_batch]."""
        perm = _permutation(self.n_rows, self.seed, epoch)[: self.steps_per_epoch * self.global_batch]
        return perm.reshape(self.steps_per_epoch, self.dp_world, self.accumulation, self.micro_batch_size)

    def rows(self, epoch: int) -> np.ndarray:
        """This rank's row indices for `epoch`: shape [steps, accumulation, micro_batch]."""
        return self.global_rows(epoch)[:, self.dp_rank]

    def micro_batches(self, epoch: int, start_step: int = 0):
        """Yield (step, row indices [micro_batch]) from `start_step` of `epoch` on."""
        rows = self.rows(epoch)
        for step in range(start_step, len(rows)):
            for micro in rows[step]:
                yield step, micro
