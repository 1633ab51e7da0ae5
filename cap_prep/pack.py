"""Packing documents into fixed-length sequences, vectorised with numpy (no loop per token).

A sequence of length L is  prefix [P tokens, class 0] + body [C = L - P tokens].
The documents of a stream (one dataset, or all datasets with mix_datasets) are laid end to end
and the stream is cut into bodies of C tokens:
- without drop_tails a document that does not fit continues in the next sequence;
- with drop_tails, documents fill a sequence in order; the document that does not fit in the
  space left is cut there and the rest of it (its tail) is dropped, and the next sequence starts
  with the next document. A document longer than C thus keeps only its first C tokens.
So drop_tails is the same cutting over each document's *kept* length (`kept_lengths`). drop_tails is
per document (its dataset's value): only a document that drops tails is cut where a sequence fills.
The last body of a stream is padded to C with pad_id (class 0). Body tokens carry their
document's class (+1/-1) unless their id is in mask_tokens (class 0; raw text only) or, in a
conversation, their turn does not train (class 0).
With document attention each row also gets position_ids: a token's offset from the start of its
segment, a segment being the prefix, the part of one document inside the row, or the padding;
the first token of every document has class 0 (nothing before it in its document predicts it; the
first token of a row is never predicted in it, whatever its class).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class DocTable:
    """The documents of one stream, in packing order; their tokens live in a flat token store."""

    start: np.ndarray  # [n] int64 offset of each document in the store
    length: np.ndarray  # [n] int64 tokens (suffix included)
    klass: np.ndarray  # [n] int8  +1 / -1
    dataset: np.ndarray  # [n] int16 index of the dataset it came from

    def take(self, index: np.ndarray) -> "DocTable":
        return DocTable(self.start[index], self.length[index], self.klass[index], self.dataset[index])

    @staticmethod
    def concat(tables: list["DocTable"]) -> "DocTable":
        return DocTable(
            *(np.concatenate([getattr(t, f) for t in tables]) for f in ("start", "length", "klass", "dataset"))
        )

    def __len__(self) -> int:
        return len(self.length)


def kept_lengths(length: np.ndarray, capacity: int, drop_tails: bool | np.ndarray) -> np.ndarray:
    """Tokens of each document that go into sequences (all of them unless drop_tails cuts a tail).

    `drop_tails`: one value, or one per document. A sequence starting at stream position p (a document's
    start, or inside a document that keeps its tail) fills at p + capacity; the document k it fills in
    is cut there if it drops tails (the next sequence starts with document k + 1), else the next
    sequence starts at p + capacity. One Python step per sequence that fills in a tail-dropping document;
    the runs of sequences in between are skipped with one division.
    """
    drop = np.broadcast_to(np.asarray(drop_tails, dtype=bool), length.shape)
    kept = length.copy()
    if not drop.any():
        return kept
    ends = np.concatenate([[0], np.cumsum(length)])
    dropping = np.flatnonzero(drop)
    p = 0
    while True:
        k = int(np.searchsorted(ends, p + capacity, side="left")) - 1  # ends[k] < p + capacity <= ends[k + 1]
        if k >= len(length):  # the stream ends before this sequence fills
            return kept
        if ends[k + 1] == p + capacity or not drop[k]:
            p += capacity  # filled exactly at a document's end, or inside one that keeps its tail
            later = dropping[np.searchsorted(dropping, k + 1) :]
            if not len(later):
                return kept
            # the sequences that fill before the next tail-dropping document starts cut nothing
            p += max(0, (int(ends[later[0]]) - p) // capacity) * capacity
            continue
        kept[k] = p + capacity - ends[k]
        p = int(ends[k + 1])


@dataclass
class Rows:
    """A block of packed sequences and what the manifest counts about them."""

    input_ids: np.ndarray  # [n, L] int32
    control_class: np.ndarray  # [n, L] int8
    dataset: np.ndarray  # [n, C] int16, the dataset of each body token, -1 = padding
    dropped_tails: np.ndarray  # [n] int64, documents whose tail was dropped at the end of the row
    dropped_tokens: np.ndarray  # [n] int64, tokens in those tails
    position_ids: np.ndarray | None = None  # [n, L] int32, with document attention

    def select(self, keep: np.ndarray) -> "Rows":
        return Rows(
            self.input_ids[keep],
            self.control_class[keep],
            self.dataset[keep],
            self.dropped_tails[keep],
            self.dropped_tokens[keep],
            None if self.position_ids is None else self.position_ids[keep],
        )


class Packer:
    """Cuts one stream of documents into sequences; `rows(r0, r1)` builds sequences r0..r1-1."""

    def __init__(
        self,
        gather,
        docs: DocTable,
        sequence_len: int,
        prefix: np.ndarray,
        pad_id: int,
        masked: np.ndarray,
        drop_tails: bool | np.ndarray,
        trained=None,
        masks_ids: np.ndarray | None = None,
        positions: bool = False,
    ):
        """gather(starts, counts): the token store's runs store[s:s + c], concatenated ([sum] int32);
        masked: [vocab] bool, True for ids given class 0; drop_tails: one value or one per document;
        trained: like gather, the int8 store of flags (0: the token's turn does not train), if any;
        masks_ids: [datasets] bool, the datasets whose tokens `masked` applies to (default all);
        positions: build position_ids (document attention)."""
        self.gather, self.docs, self.trained, self.masks_ids, self.positions = (
            gather,
            docs,
            trained,
            masks_ids,
            positions,
        )
        self.L, self.prefix, self.pad_id, self.masked = sequence_len, prefix, pad_id, masked
        self.C = sequence_len - len(prefix)
        self.kept = kept_lengths(docs.length, self.C, drop_tails)
        self.ends = np.concatenate([[0], np.cumsum(self.kept)])  # [n+1] stream offsets of documents
        self.total = int(self.ends[-1])

    def __len__(self) -> int:
        return -(-self.total // self.C)

    def rows(self, r0: int, r1: int) -> Rows:
        C, ends, docs = self.C, self.ends, self.docs
        a, b = r0 * C, min(r1 * C, self.total)
        n = r1 - r0
        # documents overlapping stream positions [a, b) and the part of each inside it
        k0 = int(np.searchsorted(ends, a, side="right")) - 1
        k1 = int(np.searchsorted(ends, b, side="left"))
        k = np.arange(k0, k1)
        lo = np.maximum(a - ends[k], 0)
        hi = np.minimum(b - ends[k], self.kept[k])
        count = hi - lo
        body = np.full(n * C, self.pad_id, dtype=np.int32)
        body[: b - a] = self.gather(docs.start[k] + lo, count)
        klass = np.zeros(n * C, dtype=np.int8)
        klass[: b - a] = np.repeat(docs.klass[k], count)
        if self.trained is not None:
            klass[: b - a] *= self.trained(docs.start[k] + lo, count)
        dataset = np.full(n * C, -1, dtype=np.int16)
        dataset[: b - a] = np.repeat(docs.dataset[k], count)
        by_id = self.masked[body]
        if self.masks_ids is not None:
            by_id &= self.masks_ids[dataset]  # (padding, -1, has class 0 anyway)
        klass[by_id] = 0
        positions = None
        if self.positions:
            p = np.arange(r0 * C, r1 * C, dtype=np.int64)
            start = np.full(n * C, self.total, dtype=np.int64)  # padding: one segment from the stream's end
            start[: b - a] = np.repeat(ends[k], count)
            klass[p == start] = 0  # a document's first token: nothing in its document predicts it
            body_positions = p - np.maximum(start, p // C * C)  # a document continued from the row before starts anew
            positions = np.empty((n, self.L), dtype=np.int32)
            positions[:, : len(self.prefix)] = np.arange(len(self.prefix))
            positions[:, len(self.prefix) :] = body_positions.reshape(n, C)

        P = len(self.prefix)
        input_ids = np.empty((n, self.L), dtype=np.int32)
        input_ids[:, :P] = self.prefix
        input_ids[:, P:] = body.reshape(n, C)
        control_class = np.zeros((n, self.L), dtype=np.int8)
        control_class[:, P:] = klass.reshape(n, C)

        # tails dropped by documents whose kept part ends inside these rows
        dropped = docs.length[k] - self.kept[k]
        ends_here = (hi == self.kept[k]) & (dropped > 0)
        row = (ends[k[ends_here] + 1] - 1) // C - r0
        tails = np.bincount(row, minlength=n).astype(np.int64)
        tail_tokens = np.bincount(row, weights=dropped[ends_here], minlength=n).astype(np.int64)
        return Rows(input_ids, control_class, dataset.reshape(n, C), tails, tail_tokens, positions)
