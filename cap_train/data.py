"""cap-train's view of cap-prep's shards: memory-mapped rows → micro batches of tensors.

A micro batch is what DeepSpeed's pipeline feeds in: ((input_ids [b,L] long, control_class [b,L]),
labels), with document attention ((input_ids, control_class, position_ids [b,L] long), labels).
The first stage derives the shifted labels and classes itself (common.models.layers), so the
second element is a placeholder DeepSpeed requires but cap never reads.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from cap_common.config import Config
from cap_train import startup
from cap_train.order import TrainOrder


def prepared_splits(cfg: Config, rank: int):
    """(train Split, eval Split). Global rank 0 runs cap-prep when the cache is missing while the
    others wait on a gloo group of their own with the long PREPARE_TIMEOUT; then every rank must see
    the prepared folder (cap_train.startup.agree)."""
    from cap_prep.build import dataset_folder, prepare
    from cap_prep.cache import is_complete
    from cap_prep.shards import open_split

    wait = dist.new_group(backend="gloo", timeout=startup.prepare_timeout())
    box: list = [None]
    if rank == 0:
        try:
            folder = dataset_folder(cfg)  # rank 0 hashes the inputs once; the others take its answer
            if not is_complete(folder):
                prepare(cfg)
            box = [("ok", str(folder))]
        except BaseException as e:
            box = [("failed", f"{type(e).__name__}: {e}")]
            dist.broadcast_object_list(box, src=0, group=wait)  # the others stop now, not at a timeout
            raise
    dist.broadcast_object_list(box, src=0, group=wait)
    dist.destroy_process_group(wait)
    outcome, value = box[0]
    if outcome == "failed":
        raise startup.PeerFailed(f"rank 0 could not prepare the data: {value}")
    folder = Path(value)
    startup.agree(
        None
        if startup.seen_within(lambda: is_complete(folder))
        else f"prepared dataset {folder} is not on this node (prepared_dir must be storage every node shares)"
    )
    return open_split(folder, "train"), open_split(folder, "eval")


def document_attention(*splits) -> bool:
    """Whether the prepared rows carry position_ids (cap-prep's document_attention): then the model
    masks attention by document. A split without rows has no columns to tell, so any split decides."""
    return any(split.document_attention for split in splits)


class Batches:
    """Micro batches gathered from a Split by row indices."""

    def __init__(self, split):
        self.split = split
        self.pulled = 0.0  # checksum of the token ids handed out since the last reset (see iterate)

    def micro(self, rows):
        ids, classes = self.split.rows(rows)
        inputs = (torch.from_numpy(ids).long(), torch.from_numpy(classes))
        positions = self.split.positions(rows)
        if positions is not None:
            inputs += (torch.from_numpy(positions).long(),)
        return inputs, torch.zeros(1)

    def iterate(self, order: TrainOrder, epoch: int, start_step: int):
        """Micro batches of `epoch` from `start_step` on (DeepSpeed pulls one step's worth per train_batch).

        Each one handed out adds Σ_{g,t} (id[g,t] + 1)·(t + 1)·(g + 1) to `pulled`, g being the row's
        place in the step's global batch (data-parallel rank, micro batch, row): summed over the
        replicas it identifies the step's rows and their order, whatever the topology."""
        for i, (_, rows) in enumerate(order.micro_batches(epoch, start_step)):
            batch = self.micro(rows)
            ids = batch[0][0].double()
            first = order.dp_rank * order.rows_per_step + (i % order.accumulation) * order.micro_batch_size
            g = torch.arange(first, first + len(rows), dtype=torch.float64)
            t = torch.arange(ids.shape[1], dtype=torch.float64)
            self.pulled += float((((ids + 1) * (t + 1)).sum(1) * (g + 1)).sum())
            yield batch
