"""Tokenizing a long document in overlapping windows, with exactly the ids of one whole-text call.

A tokenizer's encoding of one text holds ~100-150 bytes per character at its peak (ids, offsets,
token strings, masks, the normalized text's alignments), so a document longer than
LONG_DOC_CHARS is never handed to it in one call. Its text (a str, or a stream of str chunks that
is never held whole) is cut into windows [s_k, e_k) of WINDOW_CHARS characters, each starting
OVERLAP_CHARS before the previous one ends, encoded in batches (add_special_tokens=False; ids only,
encode_batch_fast). Char offsets come from separate encodings of each window's first and last
2 x overlap characters ("edges"): a head shares the window's start, a tail its end, so the head's
tokens equal the window's over their longest common prefix of ids, the tail's over the longest
common suffix, and those tokens get the edge's offsets and pre-tokenizer words.

Two consecutive windows A and B are stitched at a token index i of A and j of B with the same
start p (the cut), chosen nearest the middle of the overlap [s_B, e_A) such that
  - p is at least a quarter of the overlap from both of its ends;
  - both encodings are cut cleanly there: every token before it ends at or before p, every token
    from it on starts at or after p;
  - the MARGIN_TOKENS tokens on each side of the cut are the same (id, start, end) in A and B;
  - when the pre-tokenizer splits text into words, p is a word boundary in both, and the tokens
    around it lie outside A's last word and B's first word: a word cut by a window edge differs
    there, and B's first word is the one Metaspace(prepend_scheme="first") or a Prepend
    normalizer treats as the start of the text, which only the real document start may be.
The ids are A's tokens before the cut, then B's from it on, and so on. Where no cut qualifies (a
word or a run of spaces longer than the overlap), A is extended and the overlap doubled, and the
pair is tried again; A may run to the end of the text, so there is always a result and it is
never a guess between two tokenizations. An extended A must keep the tokens around the cut already
made into it, else WindowError.

Specials: the post-processor's template (e.g. BOS ... EOS) is read once from two probes
(encode(x, add_special_tokens=True) == prefix + encode(x, add_special_tokens=False) + suffix);
with a post-processor of another form, or truncation or padding set on the tokenizer, `Windows`
is not `usable` and the caller encodes documents whole.
"""

from __future__ import annotations

import os
from typing import Iterable, Iterator

import numpy as np

LONG_DOC_CHARS = 1_000_000  # longer documents are tokenized in windows
WINDOW_CHARS = 1 << 18  # characters per window
OVERLAP_CHARS = 1 << 12  # characters two consecutive windows share (doubled while no cut is found)
MARGIN_TOKENS = 16  # tokens that must agree on each side of a cut
BATCH_WINDOWS = min(16, max(4, os.cpu_count() or 1))  # windows per encode_batch_fast call (tens of MB each)
_PROBES = ("Hello world, 123 tokens.", "a")


class WindowError(RuntimeError):
    """An extended window did not repeat the tokens already taken from it (never seen in practice)."""


class _Text:
    """The characters of one document as they arrive: `window(a, b)` is text[a:b].

    A str is used in place (an optional `tail` is appended virtually); chunks are buffered from
    the first character still needed (`forget`), so a stream is never held whole.
    """

    def __init__(self, source: str | Iterable[str], tail: str = ""):
        if isinstance(source, str):
            self.whole, self.tail, self.length = source, tail, len(source) + len(tail)
            self.chunks = None
        else:
            self.whole, self.chunks, self.length = None, _chain(source, tail), None
            self.buf, self.base = "", 0

    def available(self, end: int) -> int:
        """Read until `end` characters are known or the text ends; returns min(end, length)."""
        if self.whole is None and self.length is None and self.base + len(self.buf) < end:
            parts, have = [self.buf], self.base + len(self.buf)
            for chunk in self.chunks:
                parts.append(chunk)
                have += len(chunk)
                if have >= end:
                    break
            else:
                self.length = have
            parts = [p for p in parts if p]
            self.buf = parts[0] if len(parts) == 1 else "".join(parts)
        return end if self.length is None else min(end, self.length)

    def ends_by(self, end: int) -> bool:
        """True if the text has no character at or after `end`."""
        return self.available(end + 1) <= end

    def window(self, a: int, b: int) -> str:
        if self.whole is not None:
            n = len(self.whole)
            text = self.whole[a:b]
            return text + self.tail[max(0, a - n) : max(0, b - n)] if b > n else text
        return self.buf[a - self.base : b - self.base]

    def forget(self, a: int) -> None:
        """Characters before `a` are no longer needed (dropped once they are half the buffer)."""
        if self.whole is None and a - self.base > len(self.buf) // 2:
            self.buf, self.base = self.buf[a - self.base :], a


def _chain(source: Iterable[str], tail: str) -> Iterator[str]:
    for chunk in source:
        if chunk:
            yield chunk
    if tail:
        yield tail


class _Window:
    """One window [start, end) of the text: its ids, and (id, start, end, word) of its first
    tokens (`head`, None for the first window) and of its last ones (`tail`, ids[tail_from:])."""

    def __init__(self, ids: np.ndarray, start: int, end: int, last: bool):
        self.ids, self.start, self.end, self.last = ids, start, end, last
        self.head: list[tuple] | None = None
        self.tail: list[tuple] = []
        self.tail_from = len(ids)


def _edge_tokens(enc, shift: int, lo: int, hi: int) -> list[tuple]:
    """(id, start, end, word) of an edge encoding's tokens lo..hi-1, offsets in document coordinates."""
    return [
        (i, a + shift, b + shift, w) for i, (a, b), w in zip(enc.ids[lo:hi], enc.offsets[lo:hi], enc.word_ids[lo:hi])
    ]


class Windows:
    """Encodes long texts in windows for one tokenizer backend (see the module docstring)."""

    def __init__(
        self,
        backend,
        window: int | None = None,
        overlap: int | None = None,
        margin: int | None = None,
        batch_windows: int | None = None,
    ):
        self.backend = backend
        self.window = window or WINDOW_CHARS
        self.overlap = overlap or OVERLAP_CHARS
        self.margin = margin or MARGIN_TOKENS
        self.batch_windows = batch_windows or BATCH_WINDOWS
        self.prefix, self.suffix = _template(backend)
        self.usable = self.prefix is not None and backend.truncation is None and backend.padding is None
        plain = backend.encode(_PROBES[0], add_special_tokens=False)
        self.words = len(set(plain.word_ids)) > 1  # does the pre-tokenizer split words?
        self.extensions = 0  # windows extended for want of a cut (statistics)

    def _windows(self, text: _Text, plan: list[tuple[int, int, bool]], overlap: int, heads: bool = True):
        """Encode the windows (start, end, last) of `plan`, with their edges."""
        fast = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
        windows = [
            _Window(np.asarray(e.ids, dtype=np.int32), s, t, last)
            for (s, t, last), e in zip(plan, fast([text.window(s, t) for s, t, _ in plan], add_special_tokens=False))
        ]
        size = 2 * overlap
        edges = []  # (window, is_head, edge start)
        for w in windows:
            if heads and w.start > 0:
                edges.append((w, True, w.start))
            if not w.last:
                edges.append((w, False, max(w.start, w.end - size)))
        texts = [text.window(a, min(w.end, a + size)) if head else text.window(a, w.end) for w, head, a in edges]
        for (w, head, a), enc in zip(edges, self.backend.encode_batch(texts, add_special_tokens=False)):
            ids = np.asarray(enc.ids, dtype=np.int32)
            n = min(len(ids), len(w.ids))
            if head:
                k = _agree(ids[:n], w.ids[:n])
                if a + size < w.end:  # the edge's last agreeing token may be one cut by the edge's end
                    k = max(0, k - 1)
                w.head = _edge_tokens(enc, a, 0, k)
            else:
                k = _agree(ids[::-1][:n], w.ids[::-1][:n])
                if a > w.start:  # likewise its first one
                    k = max(0, k - 1)
                w.tail = _edge_tokens(enc, a, len(ids) - k, len(ids))
                w.tail_from = len(w.ids) - k
        return windows

    def encode(self, source: str | Iterable[str], tail: str = "") -> Iterator[np.ndarray]:
        """The ids of `source` + `tail` without special tokens, as int32 arrays, in order."""
        text = _Text(source, tail)
        W, overlap = self.window, self.overlap
        end = text.available(W)
        a = self._windows(text, [(0, end, text.ends_by(end))], overlap)[0]
        taken = 0  # a's tokens before this index are already out
        while not a.last:
            # the next windows, each starting `overlap` before the previous one ends
            plan, s = [], a.end - overlap
            while len(plan) < self.batch_windows:
                e = text.available(s + max(W, 2 * overlap))
                plan.append((s, e, text.ends_by(e)))
                if plan[-1][2]:
                    break
                s = e - overlap
            for b in self._windows(text, plan, overlap):
                cut = self._cut(a, taken, b)
                if cut is None:
                    break
                i, j = cut
                yield a.ids[taken:i]
                a, taken, overlap = b, j, self.overlap
                text.forget(a.start)
            else:
                continue
            # no cut between a and b: extend a, double the overlap, and try again
            self.extensions += 1
            overlap *= 2
            end = text.available(a.end + overlap)
            grown = self._windows(text, [(a.start, end, text.ends_by(end))], overlap, heads=False)[0]
            keep = taken + self.margin  # the cut into a, and the tokens that agreed after it
            if taken and not np.array_equal(grown.ids[:keep], a.ids[:keep]):
                raise WindowError(
                    f"extending the window at characters {a.start}-{a.end} changed its tokens "
                    f"at the cut already made into it"
                )
            a = grown
        yield a.ids[taken:]

    def _cut(self, a: _Window, taken: int, b: _Window) -> tuple[int, int] | None:
        """(i, j): take a's tokens before i, then b's from j on; None if no cut qualifies."""
        overlap = a.end - b.start
        guard = overlap // 4
        lo, hi = b.start + guard, a.end - guard
        m = self.margin
        ta, tb = a.tail, b.head or []
        if hi <= lo or len(ta) < 2 * m or len(tb) < 2 * m:
            return None
        last_word_a = ta[-1][3] if self.words else object()
        first_word_b = tb[0][3] if self.words else object()
        first = max(0, taken - a.tail_from)  # tail tokens already taken cannot be cut at

        def inside(t, excluded):
            return lo <= t[1] and t[2] <= hi and (t[3] != excluded or t[3] is None)

        ok_a = [inside(t, last_word_a) for t in ta]
        ok_b = [inside(t, first_word_b) for t in tb]
        clean_a, clean_b = _clean(ta), _clean(tb)
        starts_b = {}
        for j, t in enumerate(tb):
            if clean_b[j]:
                starts_b.setdefault(t[1], j)
        candidates = [k for k in range(first + m, len(ta) - m + 1) if clean_a[k] and ta[k][1] in starts_b]
        middle = (lo + hi) / 2
        candidates.sort(key=lambda k: abs(ta[k][1] - middle))
        for k in candidates:
            j = starts_b[ta[k][1]]
            if j < m or j + m > len(tb):
                continue
            if not (all(ok_a[k - m : k + m]) and all(ok_b[j - m : j + m])):
                continue
            if any(x[:3] != y[:3] for x, y in zip(ta[k - m : k + m], tb[j - m : j + m])):
                continue
            if self.words and (ta[k - 1][3] == ta[k][3] or tb[j - 1][3] == tb[j][3]):
                continue
            return a.tail_from + k, j
        return None


def _agree(x: np.ndarray, y: np.ndarray) -> int:
    """Length of the common prefix of two equal-length id arrays."""
    diff = np.flatnonzero(x != y)
    return int(diff[0]) if len(diff) else len(x)


def _clean(tokens: list[tuple]) -> list[bool]:
    """clean[k]: every token before k ends at or before token k's start, and none after starts before it."""
    n = len(tokens)
    clean = [True] * n
    reach = -1
    for k, t in enumerate(tokens):
        clean[k] = reach <= t[1]
        reach = max(reach, t[2])
    low = None
    for k in range(n - 1, -1, -1):
        low = tokens[k][1] if low is None else min(low, tokens[k][1])
        clean[k] = clean[k] and low >= tokens[k][1]
    return clean


def _template(backend) -> tuple[list[int], list[int]] | tuple[None, None]:
    """(prefix, suffix): the ids the post-processor puts around a single text, the one split of
    encode(x, True) into prefix + encode(x, False) + suffix that fits every probe; (None, None)
    if none or several do (a post-processor that does something else)."""
    common = None
    for probe in _PROBES:
        plain = backend.encode(probe, add_special_tokens=False).ids
        full = backend.encode(probe, add_special_tokens=True).ids
        if not plain:
            return None, None
        splits = {
            (tuple(full[:k]), tuple(full[k + len(plain) :]))
            for k in range(len(full) - len(plain) + 1)
            if full[k : k + len(plain)] == plain
        }
        common = splits if common is None else common & splits
    if len(common) != 1:
        return None, None
    prefix, suffix = common.pop()
    return list(prefix), list(suffix)
