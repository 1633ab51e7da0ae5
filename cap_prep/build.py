"""`prepare(cfg)`: the cap-prep pipeline from a config to a published prepared folder.

1. Match the input files, fingerprint them (cache.py) and reuse a complete folder if there is one.
2. Tokenize each dataset, streaming its files in batches (tokenize.py), into a flat int32 token
   store on disk next to the shards, plus a small table per document (offset, length). A document
   longer than windows.LONG_DOC_CHARS is tokenized on its own, in windows, its tokens written as
   they come. Memory stays O(batch + documents), not O(tokens) nor O(longest document's tokens);
   packing reads the store back a step at a time (pread, not a memory map: see TokenStore).
3. Per dataset, over its non-empty documents in source order (files sorted by path, records in
   file order): control_class = 0 gives each document +1 or -1 at random; max_tokens keeps the
   documents that come first in a seeded random order while their running token total stays
   within it (qlora-pipe-lite's rule: it stops at the first document that would pass it), in
   source order; the eval split takes round(eval_fraction * n) of the n kept documents at random
   (at least 1 when eval_fraction > 0 and n >= 2; never all of them).
4. Streams: without mix_datasets, one per dataset, documents in source order, so a sequence holds
   one dataset's tokens; with mix_datasets, one stream per split, all documents in a seeded random
   order. Each stream is packed (pack.py); max_sequences then keeps a seeded uniform sample of that
   many train sequences (in packing order); eval is not capped. Shards are written in stream
   order (cap-train shuffles); the manifest is written last.
Every random choice is numpy's default_rng([seed, purpose, dataset]), so reruns are identical.
Over 300 lines: the steps above share the on-disk token store and the per-document tables, which
live here with them; the parts that stand alone are their own modules (sources, tokenize,
windows, pack, shards, cache, lock).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cap_common.errors import CapError
from cap_common.files import user_os_errors
from cap_prep import cache, lock, report, windows
from cap_prep.chat import ChatEncoder, Extract, Fields, load_template
from cap_prep.pack import DocTable, Packer, Rows
from cap_prep.shards import FORMAT_VERSION, MANIFEST, SPLITS, ShardWriter, load_manifest, write_manifest
from cap_prep.sources import InputFile, find_files, read_documents
from cap_prep.tokenize import DocumentEncoder, TokenOptions, load_tokenizer, resolve_options

SHARD_BYTES = 256 << 20  # a shard holds at most this many bytes of rows
CHUNK_BYTES = 32 << 20  # rows packed and written per step
BATCH_DOCS = 2048  # documents per tokenizer call ...
BATCH_CHARS = 4_000_000  # ... or this many characters, whichever comes first
CHAT_BATCH_CHARS = 1_000_000  # conversations: smaller, so rendering the next overlaps tokenizing this one
_CLASS, _EVAL, _MIX, _CAP, _MAX_TOKENS = 1, 2, 3, 4, 5  # purposes of the seeded generators


def rng(cfg, purpose: int, index: int = 0) -> np.random.Generator:
    return np.random.default_rng([cfg.seed, purpose, index])


def eval_count(n_documents: int, fraction: float) -> int:
    """Documents held out for eval: round(fraction * n), at least 1 (if fraction > 0, n >= 2), at most n - 1."""
    if fraction <= 0 or n_documents < 2:
        return 0
    return min(n_documents - 1, max(1, math.floor(fraction * n_documents + 0.5)))


def _where(cfg, d: int) -> str:
    return f"{cfg.source}: datasets[{d}]"


def find_inputs(cfg) -> list[list[InputFile]]:
    """The input files of every dataset; CapError for a glob that matches nothing or a bad file type."""
    return [
        find_files(ds.dataset_path, f"{_where(cfg, d)}.dataset_path", text_column=ds.format == "text")
        for d, ds in enumerate(cfg.datasets)
    ]


def extracts(cfg, inputs: list[list[InputFile]]) -> list[Extract]:
    """How each dataset's records become documents; a format left to 'auto' is decided here from
    the first record of the dataset's first file (a .txt file: raw text)."""
    out = []
    for d, (ds, files) in enumerate(zip(cfg.datasets, inputs)):
        extract = Extract(ds.format, Fields(ds.fields), ds.train_roles or cfg.train_roles)
        first = files[0]
        if extract.format is None and first.format == ".txt":
            extract.format = "text"
        elif extract.format is None:
            next(iter(read_documents(first, windows.LONG_DOC_CHARS, extract)), None)
            extract.format = extract.format or "text"
        if extract.conversations and any(f.format == ".txt" for f in files):
            txt = next(f for f in files if f.format == ".txt")
            raise CapError(
                f"{_where(cfg, d)}.dataset_path: {txt.path}: a .txt file is raw text, and this dataset is in "
                f"format '{extract.format}' (conversations come in .json, .jsonl or .parquet)"
            )
        out.append(extract)
    return out


def document_attention(cfg, formats: list[Extract]) -> bool:
    """document_attention as it applies: the key, else on when a dataset holds conversations."""
    return cfg.document_attention if cfg.document_attention is not None else any(e.conversations for e in formats)


def dataset_folder(cfg) -> Path:
    """Where the prepared dataset of `cfg` is (or will be), without building anything."""
    return cfg.prepared_root / cache.fingerprint(cfg, find_inputs(cfg), cache.FileHashes(cfg.prepared_root))


def prepare(cfg, *, force: bool = False, quiet: bool = False, shard_bytes: int = SHARD_BYTES) -> Path:
    """Build (or reuse) the prepared dataset of `cfg` and return its folder.

    Safe to call from several processes or nodes at once: one builds, the others wait and reuse.
    Raises CapError for bad inputs, leaving nothing behind.
    """
    t0 = time.monotonic()
    say = (lambda msg: None) if quiet else (lambda msg: print(msg, flush=True))
    inputs = find_inputs(cfg)
    hashes = cache.FileHashes(cfg.prepared_root)
    fp = cache.fingerprint(cfg, inputs, hashes)
    folder = cfg.prepared_root / fp
    if not force and cache.is_complete(folder):
        hashes.save()
        splits = load_manifest(folder)["splits"]
        say(
            f"cap-prep: reusing {folder} (same inputs, tokenizer and settings: {splits['train']['sequences']} train "
            f"+ {splits['eval']['sequences']} eval sequences; checked in {time.monotonic() - t0:.2f} s)"
        )
        return folder

    tok = load_tokenizer(cfg.model_dir, cfg.add_prefix_space)
    formats = extracts(cfg, inputs)
    documents = document_attention(cfg, formats)
    # each document is whole on its own with document attention: no sequence prefix unless asked for
    prefix = () if cfg.sequence_prefix is None and documents else cfg.sequence_prefix
    options = resolve_options(tok, prefix, cfg.mask_tokens, str(cfg.source))
    if cfg.sequence_len < len(options.prefix) + 1:
        raise CapError(
            f"{cfg.source}: sequence_len = {cfg.sequence_len} leaves no room for tokens after the "
            f"{len(options.prefix)}-token sequence_prefix (needs at least {len(options.prefix) + 1})"
        )
    template = load_template(tok, cfg.chat_template, cfg.model_dir) if any(e.conversations for e in formats) else None
    encoders = [
        ChatEncoder(tok, template, ds.document_suffix, options.vocab_size, _where(cfg, d))
        if e.conversations
        else DocumentEncoder(tok, options, ds.document_suffix, _where(cfg, d), ds.document_prefix, keep_bos=documents)
        for d, (ds, e) in enumerate(zip(cfg.datasets, formats))
    ]

    with lock.build_folder(cfg.prepared_root, fp, force, say) as tmp:
        if tmp is None:
            return folder
        say(f"cap-prep: building {folder}")
        manifest = _build(cfg, inputs, Plan(formats, encoders, documents), options, tmp, fp, shard_bytes, quiet)
    hashes.save()
    if not quiet:
        print(report.summary(manifest), flush=True)
        say(f"cap-prep: wrote {folder} in {time.monotonic() - t0:.1f} s")
    return folder


# ---------------------------------------------------------------- the build
@dataclass
class Plan:
    """What the build does with each dataset: its records' format, its encoder, and whether packed
    documents attend only to themselves."""

    formats: list[Extract]
    encoders: list  # DocumentEncoder or ChatEncoder per dataset
    document_attention: bool

    @property
    def conversations(self) -> bool:
        return any(e.conversations for e in self.formats)


@dataclass
class Tokenized:
    """One dataset after tokenization: its documents' place in the token store."""

    start: np.ndarray  # [n] int64
    length: np.ndarray  # [n] int64
    empty: int  # documents skipped as empty
    files: int
    bytes: int
    untrained: int = 0  # conversations skipped for having no trained turn


class TokenStore:
    """The flat token file of a build (int32 ids, or int8 flags): appended to while tokenizing, then read by runs.

    Reads are pread()s into the caller's array, not a memory map: pages of a file mapping count in
    the process's RSS once touched, and on kernels with large page-cache folios one touched token
    maps megabytes (the scattered documents of an eval split or a mix touched most of the file).
    """

    def __init__(self, path: Path, dtype=np.int32):
        self.path, self.count, self.fd, self.dtype = path, 0, None, np.dtype(dtype)
        with user_os_errors(path, "cannot write"):
            self.file = open(path, "wb")

    def write(self, ids: np.ndarray) -> None:
        with user_os_errors(self.path, "cannot write"):
            self.file.write(np.ascontiguousarray(ids, dtype=self.dtype))
        self.count += len(ids)

    def fill(self, value: int, until: int) -> None:
        """Append `value` until the store holds `until` entries."""
        while self.count < until:
            self.write(np.full(min(until - self.count, 1 << 20), value, dtype=self.dtype))

    def finish(self) -> None:
        """Done writing: open for reading."""
        with user_os_errors(self.path, "cannot write"):
            self.file.close()
        with user_os_errors(self.path, "cannot read"):
            self.fd = os.open(self.path, os.O_RDONLY)

    def gather(self, starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """store[s:s + c] for every run (s, c), concatenated; runs that continue each other are one read."""
        out = np.empty(int(counts.sum()), dtype=self.dtype)
        keep = counts > 0
        starts, counts = starts[keep], counts[keep]
        if not len(starts):
            return out
        first = np.ones(len(starts), dtype=bool)
        first[1:] = starts[1:] != starts[:-1] + counts[:-1]
        runs = zip(starts[first].tolist(), np.add.reduceat(counts, np.flatnonzero(first)).tolist())
        view, at = memoryview(out).cast("B"), 0
        with user_os_errors(self.path, "cannot read"):
            size = self.dtype.itemsize
            for start, count in runs:
                end, offset = at + size * count, size * start
                while at < end:
                    n = os.preadv(self.fd, [view[at:end]], offset)
                    if n <= 0:
                        raise OSError(errno.EIO, "the token store is shorter than written")
                    at, offset = at + n, offset + n
        return out

    def remove(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        with contextlib.suppress(OSError):
            os.remove(self.path)


def _build(cfg, inputs, plan: Plan, options: TokenOptions, tmp: Path, fp: str, shard_bytes: int, quiet: bool) -> dict:
    store = TokenStore(tmp / "tokens.tmp")
    # with conversations: 1 for a token that may train, 0 for one the roles leave untrained
    trained = TokenStore(tmp / "trained.tmp", np.int8) if plan.conversations else None
    try:
        manifest = _build_from(store, trained, cfg, inputs, plan, options, tmp, fp, shard_bytes, quiet)
    finally:
        store.remove()
        if trained is not None:
            trained.remove()
    with user_os_errors(tmp / MANIFEST, "cannot write"):
        write_manifest(tmp, manifest)
    return manifest


def _build_from(
    store: TokenStore,
    trained: TokenStore | None,
    cfg,
    inputs,
    plan: Plan,
    options: TokenOptions,
    tmp: Path,
    fp: str,
    shard_bytes: int,
    quiet: bool,
) -> dict:
    tokenized = [
        _tokenize_dataset(cfg, d, files, plan.encoders[d], plan.formats[d], store, trained, quiet)
        for d, files in enumerate(inputs)
    ]
    store.finish()
    if trained is not None:
        trained.fill(1, store.count)
        trained.finish()
    by_ids = np.array([not e.conversations for e in plan.formats])  # datasets whose tokens mask_tokens masks

    tables = [_assign(cfg, d, t) for d, t in enumerate(tokenized)]  # (train, eval) DocTables, max_tokens drops
    masked = np.zeros(options.vocab_size, dtype=bool)
    masked[options.mask] = True
    drops = np.array([cfg.drops_tails(ds) for ds in cfg.datasets])  # [datasets]: each dataset's drop_tails
    splits, per_dataset = {}, [{} for _ in cfg.datasets]
    for s, split in enumerate(SPLITS):
        streams = _streams(cfg, [t[s] for t in tables], s)
        packers = [
            Packer(
                store.gather,
                docs,
                cfg.sequence_len,
                options.prefix,
                options.pad_id,
                masked,
                drops[docs.dataset],
                trained=trained.gather if trained is not None else None,
                masks_ids=by_ids,
                positions=plan.document_attention,
            )
            for docs in streams
        ]
        keep = _cap(cfg, [len(p) for p in packers]) if split == "train" else [None] * len(packers)
        counts = Counts(len(cfg.datasets), len(options.prefix))
        row_bytes = (9 if plan.document_attention else 5) * cfg.sequence_len
        writer = ShardWriter(tmp, split, cfg.sequence_len, shard_bytes // row_bytes, plan.document_attention)
        step = max(1, CHUNK_BYTES // row_bytes)
        for packer, kept in zip(packers, keep):
            for r0 in range(0, len(packer), step):
                rows = packer.rows(r0, min(r0 + step, len(packer)))
                if kept is not None:
                    rows = rows.select(kept[r0 : r0 + step])
                writer.write(rows.input_ids, rows.control_class, rows.position_ids)
                counts.add(rows)
        splits[split] = counts.split_summary(writer.close(), sum(len(p) for p in packers))
        for d in range(len(cfg.datasets)):
            per_dataset[d][split] = counts.dataset_summary(d, len(tables[d][s]))
    return {
        "format_version": FORMAT_VERSION,
        "fingerprint": fp,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "sequence_len": cfg.sequence_len,
        "document_attention": plan.document_attention,
        "tokenizer": {
            "name": options.name,
            "vocab_size": options.vocab_size,
            "bos_id": options.bos_id,
            "eos_id": options.eos_id,
            "pad_id": options.pad_id,
            "files": cache.tokenizer_hashes(cfg.model_dir),
        },
        "prefix_ids": options.prefix.tolist(),
        "mask_ids": options.mask.tolist(),
        "prep_config": cache.prep_keys(cfg),
        "datasets": [
            {
                "dataset_path": ds.dataset_path,
                "format": plan.formats[d].format,
                "control_class": ds.control_class,
                "files": t.files,
                "bytes": t.bytes,
                "documents": len(t.length),
                "empty_documents": t.empty,
                "untrained_conversations": t.untrained,
                "max_tokens": ds.max_tokens,
                "max_tokens_dropped_documents": tables[d][2][0],
                "max_tokens_dropped_tokens": tables[d][2][1],
                **per_dataset[d],
            }
            for d, (ds, t) in enumerate(zip(cfg.datasets, tokenized))
        ],
        "splits": splits,
    }


def _tokenize_dataset(
    cfg,
    d: int,
    files: list[InputFile],
    encoder,
    extract: Extract,
    store: TokenStore,
    trained: TokenStore | None,
    quiet: bool,
) -> Tokenized:
    """Stream the dataset's documents through the tokenizer in batches, appending tokens to `store`
    (and, for conversations, their trained flags to `trained`); a text document longer than
    windows.LONG_DOC_CHARS goes alone, in windows (encode_long)."""
    total_bytes = sum(f.size for f in files)
    offset = store.count
    chat = isinstance(encoder, ChatEncoder)
    if not chat and extract.fields["text"] == "text":
        extract = None  # the readers' own "text" path (a Parquet column read whole)
    lengths, counts = [], {"empty": 0, "tokens": 0, "untrained": 0}
    batch, chars, read = [], 0, 0
    in_flight = None  # (future of the tokenizer's encodings, input bytes read up to that batch)
    # bars only on a terminal (None), so logs and captured output stay clean
    with (
        tqdm(
            total=total_bytes,
            unit="B",
            unit_scale=True,
            desc=f"dataset {d}",
            disable=True if quiet else None,
            file=sys.stderr,
            dynamic_ncols=True,
        ) as bar,
        ThreadPoolExecutor(1) as tokenizer_thread,
    ):

        def collect(job):
            future, read_until = job
            if chat:
                flat, lens, flags, n_untrained = encoder.to_arrays(*future.result())
                trained.fill(1, store.count)  # the raw-text tokens before these may train
                trained.write(flags)
                counts["untrained"] += n_untrained
                n_empty = 0
            else:
                flat, lens, n_empty = encoder.to_arrays(*future.result())
            store.write(flat)
            lengths.append(lens)
            counts["empty"] += n_empty
            counts["tokens"] += len(flat)
            bar.update(read_until - bar.n)
            bar.set_postfix(tokens=f"{counts['tokens']:,}", refresh=False)

        def submit():
            """Hand the batch to the tokenizer thread; store the previous batch while it works."""
            nonlocal batch, chars, in_flight
            previous, in_flight = in_flight, (tokenizer_thread.submit(encoder.encode_texts, batch), read)
            if previous is not None:
                collect(previous)
            batch, chars = [], 0

        def flush():
            """Store every document read so far (a long document's tokens follow theirs)."""
            nonlocal in_flight
            if batch:
                submit()
            if in_flight is not None:
                collect(in_flight)
                in_flight = None

        def long_document(doc) -> None:
            flush()
            n = encoder.encode_long(doc, store.write)
            if n:
                lengths.append(np.array([n], dtype=np.int64))
                counts["tokens"] += n
            else:
                counts["empty"] += 1
            bar.update(read - bar.n)
            bar.set_postfix(tokens=f"{counts['tokens']:,}", refresh=False)

        done = 0
        for f in files:
            for doc, nbytes in read_documents(f, windows.LONG_DOC_CHARS, extract):
                read += nbytes
                if chat:
                    doc = encoder.text_and_spans(doc)  # rendered here, while the thread tokenizes the last batch
                    chars += len(doc[0])
                elif not isinstance(doc, str) or len(doc) > windows.LONG_DOC_CHARS:
                    long_document(doc)
                    continue
                else:
                    chars += len(doc)
                batch.append(doc)
                if len(batch) >= BATCH_DOCS or chars >= (CHAT_BATCH_CHARS if chat else BATCH_CHARS):
                    submit()
            done += f.size
            read = done
        flush()
    empty, untrained = counts["empty"], counts["untrained"]
    length = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    if len(length) == 0:
        what = f"{untrained} conversation(s) without a trained turn" if chat else f"{empty} empty document(s)"
        raise CapError(
            f"{_where(cfg, d)}: no documents left in '{cfg.datasets[d].dataset_path}' ({len(files)} file(s), {what})"
        )
    if chat:
        encoder.note_end_of_turn(_where(cfg, d))
    start = offset + np.cumsum(length) - length
    return Tokenized(start, length, empty, len(files), total_bytes, untrained)


def max_tokens_keep(length: np.ndarray, max_tokens: int, order: np.ndarray) -> np.ndarray:
    """[n] bool: the documents that come first in `order` while the running total of their lengths
    stays <= max_tokens (the first one that would pass it and all after it are dropped)."""
    total = np.cumsum(length[order])
    keep = np.zeros(len(length), dtype=bool)
    keep[order[: int(np.searchsorted(total, max_tokens, side="right"))]] = True
    return keep


def _assign(cfg, d: int, t: Tokenized) -> tuple[DocTable, DocTable, tuple[int, int]]:
    """Classes per document, max_tokens and the eval split of dataset d: (train, eval) tables in
    source order, and the (documents, tokens) max_tokens dropped."""
    n = len(t.length)
    ds = cfg.datasets[d]
    klass = ds.control_class
    if klass == 0:
        classes = rng(cfg, _CLASS, d).choice(np.array([-1, 1], dtype=np.int8), size=n)
    else:
        classes = np.full(n, klass, dtype=np.int8)
    table = DocTable(t.start, t.length, classes, np.full(n, d, dtype=np.int16))
    dropped = (0, 0)
    if ds.max_tokens is not None:
        order = rng(cfg, _MAX_TOKENS, d).permutation(n)
        keep = max_tokens_keep(t.length, ds.max_tokens, order)
        if not keep.any():
            raise CapError(
                f"{_where(cfg, d)}: max_tokens = {ds.max_tokens} keeps no document (the first in the seeded "
                f"order has {int(t.length[order[0]])} tokens)"
            )
        dropped = (int((~keep).sum()), int(t.length[~keep].sum()))
        table = table.take(keep)
        n = len(table)
    is_eval = np.zeros(n, dtype=bool)
    is_eval[rng(cfg, _EVAL, d).choice(n, eval_count(n, cfg.eval_fraction), replace=False)] = True
    return table.take(~is_eval), table.take(is_eval), dropped


def _streams(cfg, tables: list[DocTable], split: int) -> list[DocTable]:
    """The document streams of one split: one per dataset, or one shuffled mix of all."""
    tables = [t for t in tables if len(t)]
    if not cfg.mix_datasets or not tables:
        return tables
    mixed = DocTable.concat(tables)
    return [mixed.take(rng(cfg, _MIX, split).permutation(len(mixed)))]


def _cap(cfg, sizes: list[int]) -> list[np.ndarray | None]:
    """max_sequences: per stream, a mask of the train sequences kept (a seeded uniform sample)."""
    total = sum(sizes)
    if cfg.max_sequences is None or total <= cfg.max_sequences:
        return [None] * len(sizes)
    keep = np.zeros(total, dtype=bool)
    keep[rng(cfg, _CAP).choice(total, cfg.max_sequences, replace=False)] = True
    bounds = np.cumsum([0] + sizes)
    return [keep[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


class Counts:
    """What the manifest reports about the rows written for one split, per dataset and in total."""

    FIELDS = ("sequences", "tokens", "masked_tokens", "dropped_tails", "dropped_tail_tokens")

    def __init__(self, n_datasets: int, prefix_len: int):
        self.n, self.P = n_datasets, prefix_len
        self.per = {k: np.zeros(n_datasets, dtype=np.int64) for k in self.FIELDS}
        self.rows = self.padding = self.positive = self.negative = 0

    def add(self, rows: Rows) -> None:
        ds, cls = rows.dataset, rows.control_class[:, self.P :]
        shifted = ds.astype(np.int64) + 1  # 0 = padding, d + 1 = dataset d
        tokens = np.bincount(shifted.reshape(-1), minlength=self.n + 1)
        self.rows += len(ds)
        self.padding += int(tokens[0])
        self.per["tokens"] += tokens[1:]
        self.per["masked_tokens"] += np.bincount(shifted[cls == 0], minlength=self.n + 1)[1:]
        self.positive += int(np.count_nonzero(cls == 1))
        self.negative += int(np.count_nonzero(cls == -1))
        # datasets present in each row: look only where the dataset changes along the row
        change = np.ones(ds.shape, dtype=bool)
        change[:, 1:] = ds[:, 1:] != ds[:, :-1]
        r, c = np.nonzero(change)
        present = np.zeros((len(ds), self.n + 1), dtype=bool)
        present[r, shifted[r, c]] = True
        self.per["sequences"] += present[:, 1:].sum(0)
        cut = rows.dropped_tails > 0  # the cut document is the row's last body token
        np.add.at(self.per["dropped_tails"], ds[cut, -1], rows.dropped_tails[cut])
        np.add.at(self.per["dropped_tail_tokens"], ds[cut, -1], rows.dropped_tokens[cut])

    def dataset_summary(self, d: int, documents: int) -> dict:
        return {"documents": documents, **{k: int(v[d]) for k, v in self.per.items()}}

    def split_summary(self, shards: list[dict], packed: int) -> dict:
        return {
            "sequences": self.rows,
            "sequences_before_max": packed,
            "tokens": int(self.per["tokens"].sum()),
            "masked_tokens": int(self.per["masked_tokens"].sum()),
            "prefix_tokens": self.rows * self.P,
            "padding_tokens": self.padding,
            "loss_tokens": {"+1": self.positive, "-1": self.negative},
            "dropped_tails": int(self.per["dropped_tails"].sum()),
            "dropped_tail_tokens": int(self.per["dropped_tail_tokens"].sum()),
            "shards": shards,
        }
