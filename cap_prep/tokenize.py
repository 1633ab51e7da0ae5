"""The tokenizer side of cap-prep: loading it, resolving the token options, encoding batches.

A document's tokens (decided here, used by pack.py):
    tokens = prefix_ids                             # document_prefix as token ids
             + tokenizer(prefix_text + text + suffix_text)
               (the tokenizer's own special tokens included)
               minus a leading BOS                  # the sequence prefix (default BOS) starts every sequence
                                                    # (kept with document attention: no sequence prefix)
             + suffix_ids                           # document_suffix as token ids
where document_suffix = None appends EOS only when the encoding does not already end with EOS
(and the tokenizer has one); "" appends nothing; a string is appended to the text before
tokenizing; an id or a list of ids is appended after. document_prefix likewise: None or ""
nothing, a string is put before the text, ids before the tokens. A document whose text is
empty, or tokenizes to nothing (before prefix ids and suffix), is skipped and counted as empty.

Batches go through the fast tokenizer's Rust batch encoder (`encode_batch_fast`), which runs on
all cores (rayon) when TOKENIZERS_PARALLELISM is true (the default set here) and releases the GIL,
so the caller can read and convert other batches meanwhile (`encode_texts` / `to_arrays`).
A document longer than windows.LONG_DOC_CHARS goes through `encode_long` instead: the same ids,
from windows of the text (windows.py), written out as they come.
"""

from __future__ import annotations

import itertools
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cap_common.errors import CapError
from cap_prep.windows import Windows


@dataclass(frozen=True)
class TokenOptions:
    """The resolved token-level options shared by all datasets."""

    vocab_size: int  # len(tokenizer): ids must be below it
    bos_id: int | None
    eos_id: int | None
    pad_id: int  # padding: pad, else eos, else 0
    prefix: np.ndarray  # [P] int32, starts every sequence (class 0)
    mask: np.ndarray  # [K] int32, ids given class 0
    special_ids: tuple[int, ...]
    name: str


def load_tokenizer(model_dir: Path, add_prefix_space: bool = False):
    """The fast tokenizer of `model_dir` (transformers.AutoTokenizer); CapError if there is none."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    import transformers

    try:
        tok = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as e:  # noqa: BLE001 - any failure to load a user's tokenizer is a user error
        raise CapError(f"model_dir {model_dir}: cannot load the tokenizer ({type(e).__name__}: {e})") from None
    if getattr(tok, "backend_tokenizer", None) is None:
        raise CapError(
            f"model_dir {model_dir}: cap-prep needs a fast tokenizer (tokenizer.json), got {type(tok).__name__}"
        )
    if add_prefix_space:
        _set_prefix_space(tok.backend_tokenizer)
    return tok


def _set_prefix_space(backend) -> None:
    """Turn on add_prefix_space in a ByteLevel / Metaspace pre-tokenizer (also inside a Sequence)."""
    from tokenizers import pre_tokenizers as pt

    def fix(p) -> bool:
        if isinstance(p, pt.ByteLevel):
            p.add_prefix_space = True
            return True
        if isinstance(p, pt.Metaspace):
            p.prepend_scheme = "always"
            return True
        if isinstance(p, pt.Sequence):
            found = False
            i = 0
            while True:
                try:
                    found |= fix(p[i])
                except IndexError:
                    return found
                i += 1
        return False

    pre = backend.pre_tokenizer
    if pre is not None and fix(pre):
        backend.pre_tokenizer = pre
    else:
        print(
            f"cap-prep: warning: add_prefix_space has no effect on this tokenizer's pre-tokenizer ({pre})",
            file=sys.stderr,
        )


def special_ids(tok) -> tuple[int, ...]:
    """All special token ids: the named ones (bos, eos, pad, ...) and added tokens marked special."""
    ids = set(tok.all_special_ids)
    ids.update(i for i, t in getattr(tok, "added_tokens_decoder", {}).items() if getattr(t, "special", False))
    return tuple(sorted(ids))


def check_ids(ids, vocab_size: int, where: str) -> np.ndarray:
    """ids as int32, or a CapError naming `where` if one is outside the vocabulary."""
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise CapError(f"{where}: token id {bad[0]} is out of the tokenizer's vocabulary (ids 0..{vocab_size - 1})")
    return np.asarray(ids, dtype=np.int32).reshape(-1)


def resolve_options(tok, sequence_prefix, mask_tokens, where: str) -> TokenOptions:
    """Resolve sequence_prefix (None = BOS if any) and mask_tokens (True = all special ids)."""
    vocab = len(tok)
    bos, eos = tok.bos_token_id, tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else (eos if eos is not None else 0)
    if sequence_prefix is None:
        prefix = [] if bos is None else [bos]
    elif isinstance(sequence_prefix, str):
        prefix = tok.backend_tokenizer.encode(sequence_prefix, add_special_tokens=False).ids
    else:
        prefix = list(sequence_prefix)
    specials = special_ids(tok)
    mask = specials if mask_tokens is True else (() if mask_tokens is False else mask_tokens)
    return TokenOptions(
        vocab_size=vocab,
        bos_id=bos,
        eos_id=eos,
        pad_id=pad,
        prefix=check_ids(prefix, vocab, f"{where}: sequence_prefix = {sequence_prefix!r}"),
        mask=check_ids(mask, vocab, f"{where}: mask_tokens = {mask_tokens!r}"),
        special_ids=specials,
        name=str(getattr(tok, "name_or_path", "")),
    )


def flat_ids(encodings) -> tuple[np.ndarray, np.ndarray]:
    """The ids of a batch of encodings laid end to end [T] int32, and each encoding's length [n] int64."""
    ids = [e.ids for e in encodings]
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    return np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=int(lengths.sum())), lengths


class DocumentEncoder:
    """Encodes batches of one dataset's documents into (flat tokens [T] int32, lengths [n] int64)."""

    def __init__(self, tok, options: TokenOptions, document_suffix, where: str, document_prefix=None, keep_bos=False):
        """keep_bos: leave the tokenizer's leading BOS on (document attention: each document stands alone)."""
        self.backend = tok.backend_tokenizer
        self.encode = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
        self.bos = None if keep_bos else options.bos_id  # the leading id dropped, if any
        self.eos = options.eos_id
        self.suffix_text = document_suffix if isinstance(document_suffix, str) else ""
        self.eos_if_missing = document_suffix is None and self.eos is not None
        self.suffix_ids = check_ids(
            _ids(document_suffix), options.vocab_size, f"{where}: document_suffix = {document_suffix!r}"
        )
        self.prefix_text = document_prefix if isinstance(document_prefix, str) else ""
        self.prefix_ids = check_ids(
            _ids(document_prefix), options.vocab_size, f"{where}: document_prefix = {document_prefix!r}"
        )
        self._windows = None

    @property
    def windows(self) -> Windows:
        if self._windows is None:
            self._windows = Windows(self.backend)
        return self._windows

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, int]:
        """Tokens of the non-empty documents of `texts`, their lengths, and how many were empty."""
        return self.to_arrays(*self.encode_texts(texts))

    def encode_texts(self, texts: list[str]):
        """The tokenizer's encodings of the non-empty texts (runs without the GIL), and how many were empty."""
        if self.prefix_text or self.suffix_text:
            kept = [self.prefix_text + t + self.suffix_text for t in texts if t]
        else:
            kept = [t for t in texts if t]
        return (self.encode(kept, add_special_tokens=True) if kept else []), len(texts) - len(kept)

    def encode_long(self, source, write) -> int:
        """The tokens of one long document (a str, or an iterable of str chunks), finished by the
        document rule and passed to write(int32 array) as they come; returns their number
        (0: the document is empty, nothing was written)."""
        w = self.windows
        if not w.usable:  # a post-processor windows cannot reproduce: encode the whole text
            text = source if isinstance(source, str) else "".join(source)
            flat, lengths, n_empty = self([text])
            if n_empty:
                return 0
            write(flat)
            return len(flat)
        if self.prefix_text and isinstance(source, str):
            source = self.prefix_text + source
        elif self.prefix_text:
            source = itertools.chain([self.prefix_text], source)
        pieces = itertools.chain(
            [np.asarray(w.prefix, dtype=np.int32)],
            w.encode(source, self.suffix_text),
            [np.asarray(w.suffix, dtype=np.int32)],
        )
        n, last, first = 0, None, True
        for ids in pieces:
            if first and len(ids):
                first = False
                if ids[0] == self.bos:
                    ids = ids[1:]  # the leading BOS (the sequence prefix supplies it)
            if len(ids):
                if n == 0 and len(self.prefix_ids):  # before the first token: the document is not empty
                    write(self.prefix_ids)
                    n += len(self.prefix_ids)
                write(ids)
                n += len(ids)
                last = int(ids[-1])
        if n and self.eos_if_missing and last != self.eos:
            write(np.asarray([self.eos], dtype=np.int32))
            n += 1
        elif n and len(self.suffix_ids):
            write(self.suffix_ids)
            n += len(self.suffix_ids)
        return n

    def to_arrays(self, encodings, n_empty: int) -> tuple[np.ndarray, np.ndarray, int]:
        """Flat tokens [T] int32 and lengths [n] int64 of `encodings`, finished by the document rule."""
        flat, lengths = flat_ids(encodings)
        flat, lengths, n_blank = self._finish(flat, lengths)
        return flat, lengths, n_empty + n_blank

    def _finish(self, flat: np.ndarray, lengths: np.ndarray):
        """Drop each leading BOS and empty bodies, then put the prefix ids before and the suffix after;
        vectorised over the batch."""
        starts = np.cumsum(lengths) - lengths
        nonempty = lengths > 0
        skip = np.zeros(len(lengths), dtype=np.int64)
        if self.bos is not None and len(flat):
            first = flat[np.minimum(starts, len(flat) - 1)]
            skip = (nonempty & (first == self.bos)).astype(np.int64)
        body = lengths - skip
        keep = body > 0
        n_blank = int((~keep).sum())
        starts, body = starts[keep] + skip[keep], body[keep]
        if self.eos_if_missing:
            add = flat[starts + body - 1] != self.eos
            suffix = np.asarray([self.eos], dtype=np.int32)
        else:
            suffix = self.suffix_ids
            add = np.full(len(body), len(suffix) > 0)
        head = self.prefix_ids
        P = len(head)
        if not P and not skip.any() and not add.any() and keep.all():
            return flat, lengths, 0
        new_lengths = P + body + add * len(suffix)
        new_starts = np.cumsum(new_lengths) - new_lengths
        out = np.empty(int(new_lengths.sum()), dtype=np.int32)
        body_starts = np.cumsum(body) - body
        n_body = int(body.sum())
        src = np.arange(n_body) + np.repeat(starts - body_starts, body)
        dst = np.arange(n_body) + np.repeat(new_starts + P - body_starts, body)
        out[dst] = flat[src]
        if P:
            out[new_starts[:, None] + np.arange(P)] = head
        if add.any():
            at = new_starts[add] + P + body[add]
            out[at[:, None] + np.arange(len(suffix))] = suffix
        return out, new_lengths, n_blank


def _ids(spec) -> tuple[int, ...]:
    """The token ids of a document_prefix / document_suffix (none for None or a string)."""
    return () if spec is None or isinstance(spec, str) else tuple(spec)
