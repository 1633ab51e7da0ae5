"""The dataset contract on disk (docs/formats.md, section 2): Arrow shards, the manifest, and the readers.

A prepared folder holds `manifest.json` and `train-NNNNN.arrow` / `eval-NNNNN.arrow`, each an
uncompressed Arrow IPC *file* with the columns
    input_ids      fixed_size_list<int32>[L]
    control_class  fixed_size_list<int8>[L]    (+1 / -1, 0 = no loss)
    position_ids   fixed_size_list<int32>[L]   (only with document_attention: each token's place in
                                                its document's part of the row, 0 where one starts)
written as a few record batches, so `open_split` gives zero-copy numpy views of a memory map.
Shards are not fsynced (that costs as much as writing them); instead a folder only counts as
complete when every shard has the size its manifest records (cache.is_complete).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa

from cap_common.errors import CapError
from cap_common.files import user_os_errors, write_json

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "eval")


def schema(sequence_len: int, positions: bool = False) -> pa.Schema:
    def column(name: str, kind) -> pa.Field:
        return pa.field(name, pa.list_(pa.field("item", kind, nullable=False), sequence_len), nullable=False)

    columns = [column("input_ids", pa.int32()), column("control_class", pa.int8())]
    if positions:
        columns.append(column("position_ids", pa.int32()))
    return pa.schema(
        columns, metadata={"cap.format_version": str(FORMAT_VERSION), "cap.sequence_len": str(sequence_len)}
    )


class ShardWriter:
    """Writes one split's rows into shards of at most `max_rows` rows; `close()` lists them."""

    def __init__(self, folder: Path, split: str, sequence_len: int, max_rows: int, positions: bool = False):
        self.folder, self.split, self.L, self.max_rows = folder, split, sequence_len, max(1, max_rows)
        self.schema = schema(sequence_len, positions)
        self.shards: list[dict] = []
        self._writer = self._sink = None
        self._rows = 0

    def write(self, input_ids: np.ndarray, control_class: np.ndarray, position_ids: np.ndarray | None = None) -> None:
        """Append rows: input_ids [n, L] int32, control_class [n, L] int8 (and position_ids [n, L] int32
        when the writer was made with positions=True)."""
        columns = [(input_ids, pa.int32()), (control_class, pa.int8())]
        if len(self.schema) == 3:
            columns.append((position_ids, pa.int32()))
        done = 0
        while done < len(input_ids):
            if self._writer is None:
                self._open()
            take = min(len(input_ids) - done, self.max_rows - self._rows)
            batch = pa.record_batch(
                [
                    pa.FixedSizeListArray.from_arrays(pa.array(a[done : done + take].reshape(-1), kind), self.L)
                    for a, kind in columns
                ],
                schema=self.schema,
            )
            with _writing(self._path):
                self._writer.write_batch(batch)
            self._rows += take
            done += take
            if self._rows == self.max_rows:
                self._close_shard()

    def close(self) -> list[dict]:
        if self._writer is not None:
            self._close_shard()
        return self.shards

    def _open(self) -> None:
        name = f"{self.split}-{len(self.shards):05d}.arrow"
        self._path = self.folder / name
        with _writing(self._path):
            self._sink = pa.OSFile(str(self._path), "wb")
            self._writer = pa.ipc.new_file(self._sink, self.schema)
        self._rows = 0

    def _close_shard(self) -> None:
        with _writing(self._path):
            self._writer.close()
            self._sink.close()
            size = self._path.stat().st_size
        self.shards.append({"file": self._path.name, "rows": self._rows, "bytes": size})
        self._writer = self._sink = None


@contextlib.contextmanager
def _writing(path: Path):
    """An OSError while writing `path` (pyarrow's included) as the CapError `<path>: cannot write (<OS text>)`."""
    with user_os_errors(path, "cannot write"):
        try:
            yield
        except OSError as e:
            if e.errno and e.filename is None:  # pyarrow: "Error writing bytes to file. Detail: ..."
                raise OSError(e.errno, os.strerror(e.errno)) from None
            raise


# ---------------------------------------------------------------- manifest
def write_manifest(folder: Path, manifest: dict) -> None:
    write_json(folder / MANIFEST, manifest)


def load_manifest(folder: str | Path) -> dict:
    """The manifest of a prepared folder; CapError if it is missing, unreadable or of another format."""
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise CapError(f"{folder}: not a prepared dataset (no {MANIFEST}); run cap-prep") from None
    except (OSError, json.JSONDecodeError) as e:
        raise CapError(f"{path}: cannot read the manifest ({e})") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CapError(
            f"{path}: format version {manifest.get('format_version')!r}, this cap reads "
            f"{FORMAT_VERSION}; rerun cap-prep"
        )
    return manifest


# ---------------------------------------------------------------- reading
class Split:
    """The rows of one split across its shards, as zero-copy numpy views of memory-mapped files.

    `input_ids[i]` / `control_class[i]` are the [n_i, L] arrays of the i-th record batch;
    `split[r]` is row r as ([L] int32, [L] int8); `split.rows(indices)` gathers [k, L] copies.
    With document attention (`document_attention`), `position_ids[i]` and `split.positions(indices)`
    give each token's position in its document; otherwise they are empty / None.
    """

    def __init__(self, folder: Path, shards: list[dict], sequence_len: int):
        self.sequence_len = sequence_len
        self.input_ids: list[np.ndarray] = []
        self.control_class: list[np.ndarray] = []
        self.position_ids: list[np.ndarray] = []
        self._maps = []
        for shard in shards:
            source = pa.memory_map(str(folder / shard["file"]), "r")
            self._maps.append(source)
            reader = pa.ipc.open_file(source)
            for b in range(reader.num_record_batches):
                batch = reader.get_batch(b)
                self.input_ids.append(_matrix(batch.column(0), sequence_len))
                self.control_class.append(_matrix(batch.column(1), sequence_len))
                if batch.num_columns > 2:
                    self.position_ids.append(_matrix(batch.column(2), sequence_len))
        self.document_attention = bool(self.position_ids)
        sizes = [len(a) for a in self.input_ids]
        self._starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        if not -len(self) <= row < len(self):
            raise IndexError(row)
        row %= len(self)
        chunk = int(np.searchsorted(self._starts, row, side="right")) - 1
        local = row - int(self._starts[chunk])
        return self.input_ids[chunk][local], self.control_class[chunk][local]

    def rows(self, indices) -> tuple[np.ndarray, np.ndarray]:
        """Rows `indices` (any order) as new arrays input_ids [k, L] int32, control_class [k, L] int8."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        ids = np.empty((len(indices), self.sequence_len), dtype=np.int32)
        cls = np.empty((len(indices), self.sequence_len), dtype=np.int8)
        chunk = np.searchsorted(self._starts, indices, side="right") - 1
        for c in np.unique(chunk):
            where = chunk == c
            local = indices[where] - self._starts[c]
            ids[where] = self.input_ids[c][local]
            cls[where] = self.control_class[c][local]
        return ids, cls

    def positions(self, indices) -> np.ndarray | None:
        """position_ids [k, L] int32 of rows `indices` (any order); None without document attention."""
        if not self.document_attention:
            return None
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        out = np.empty((len(indices), self.sequence_len), dtype=np.int32)
        chunk = np.searchsorted(self._starts, indices, side="right") - 1
        for c in np.unique(chunk):
            where = chunk == c
            out[where] = self.position_ids[c][indices[where] - self._starts[c]]
        return out


def _matrix(column: pa.FixedSizeListArray, sequence_len: int) -> np.ndarray:
    """[n, L] zero-copy view of a fixed-size list column."""
    values = column.values.slice(column.offset * sequence_len, len(column) * sequence_len)
    return values.to_numpy(zero_copy_only=True).reshape(len(column), sequence_len)


def open_split(folder: str | Path, split: str) -> Split:
    """Memory-map the `split` ("train" or "eval") shards of a prepared folder."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    manifest = load_manifest(folder)
    return Split(Path(folder), manifest["splits"][split]["shards"], manifest["sequence_len"])
