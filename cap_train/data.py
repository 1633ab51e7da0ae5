"""cap-train's view of cap-prep's shards: memory-mapped rows → micro batches of tensors.

A micro batch is what DeepSpeed's pipeline feeds in: ((input_ids [b,L] long, control_class [b,L]),
labels). The first stage derives the shifted labels and classes itself (common.models.layers),
so the second element is a placeholder DeepSpeed requires but cap never reads.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from cap_common.config import Config
from cap_common.errors import CapError
from cap_train.order import TrainOrder


def prepared_splits(cfg: Config, rank: int):
    """(train Split, eval Split); global rank 0 runs cap-prep when the cache is missing."""
    from cap_prep.build import dataset_folder, prepare
    from cap_prep.cache import is_complete
    from cap_prep.shards import open_split

    folder = dataset_folder(cfg) if rank == 0 else None
    if rank == 0 and not is_complete(folder):
        prepare(cfg)
    # rank 0 hashes the inputs once; the others take its answer instead of re-reading every file
    box = [str(folder) if folder else None]
    dist.broadcast_object_list(box, src=0)
    folder = Path(box[0])
    if not is_complete(folder):
        raise CapError(f"{folder}: prepared dataset missing on this node (is prepared_dir on shared storage?)")
    return open_split(folder, "train"), open_split(folder, "eval")


class Batches:
    """Micro batches gathered from a Split by row indices."""

    def __init__(self, split):
        self.split = split

    def micro(self, rows):
        ids, classes = self.split.rows(rows)
        ids = torch.from_numpy(ids).long()
        classes = torch.from_numpy(classes)
        return (ids, classes), torch.zeros(1)

    def iterate(self, order: TrainOrder, epoch: int, start_step: int):
        """Micro batches of `epoch` from `start_step` on (DeepSpeed pulls one step's worth per train_batch)."""
        for _, rows in order.micro_batches(epoch, start_step):
            yield self.micro(rows)
