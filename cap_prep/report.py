"""The summary table cap-prep prints at the end of a build, made from the manifest alone."""

from __future__ import annotations

from pathlib import Path


def _short(pattern: str, width: int = 32) -> str:
    parts = Path(pattern).parts
    text = str(Path(*parts[-2:])) if len(parts) >= 2 else pattern
    return text if len(text) <= width else "…" + text[-(width - 1) :]


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def summary(manifest: dict) -> str:
    """One row per dataset (train and eval side by side), a total row, and one line per split."""
    head = (
        "dataset",
        "class",
        "files",
        "docs train",
        "docs eval",
        "tokens train",
        "seqs train",
        "masked",
        "dropped tails",
        "tokens eval",
        "seqs eval",
    )
    rows = []
    for ds in manifest["datasets"]:
        tr, ev = ds["train"], ds["eval"]
        klass = {1: "+1", -1: "-1", 0: "±1"}[ds["control_class"]]
        rows.append(
            (
                _short(ds["dataset_path"]),
                klass,
                ds["files"],
                tr["documents"],
                ev["documents"],
                tr["tokens"],
                tr["sequences"],
                _pct(tr["masked_tokens"], tr["tokens"]),
                tr["dropped_tails"],
                ev["tokens"],
                ev["sequences"],
            )
        )
    tr, ev = manifest["splits"]["train"], manifest["splits"]["eval"]
    rows.append(
        (
            "total",
            "",
            sum(d["files"] for d in manifest["datasets"]),
            sum(d["train"]["documents"] for d in manifest["datasets"]),
            sum(d["eval"]["documents"] for d in manifest["datasets"]),
            tr["tokens"],
            tr["sequences"],
            _pct(tr["masked_tokens"], tr["tokens"]),
            tr["dropped_tails"],
            ev["tokens"],
            ev["sequences"],
        )
    )

    def cell(v):
        return f"{v:,}" if isinstance(v, int) else str(v)

    table = [tuple(cell(v) for v in r) for r in [head] + rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in table]
    lines.insert(1, "-" * len(lines[0]))
    lines.insert(len(lines) - 1, "-" * len(lines[0]))
    L = manifest["sequence_len"]
    for name in ("train", "eval"):
        s = manifest["splits"][name]
        capped = (
            f", max_sequences kept {s['sequences']:,} of {s['sequences_before_max']:,}"
            if s["sequences_before_max"] != s["sequences"]
            else ""
        )
        lines.append(
            f"{name}: {s['sequences']:,} sequences of {L} tokens in {len(s['shards'])} shard(s); "
            f"padding {_pct(s['padding_tokens'], s['sequences'] * L)}, loss tokens +1 "
            f"{s['loss_tokens']['+1']:,} / -1 {s['loss_tokens']['-1']:,}{capped}"
        )
    for ds in manifest["datasets"]:
        skipped = [
            f"{ds[key]:,} {what}"
            for key, what in (("empty_documents", "empty"), ("untrained_conversations", "without a trained turn"))
            if ds.get(key)
        ]
        if skipped:
            lines.append(f"{_short(ds['dataset_path'])}: skipped {' and '.join(skipped)}")
        if ds.get("max_tokens_dropped_documents"):
            lines.append(
                f"{_short(ds['dataset_path'])}: max_tokens = {ds['max_tokens']:,} kept "
                f"{ds['documents'] - ds['max_tokens_dropped_documents']:,} of {ds['documents']:,} documents "
                f"({ds['max_tokens_dropped_tokens']:,} tokens dropped)"
            )
    formats = sorted({ds.get("format", "text") for ds in manifest["datasets"]})
    if manifest.get("document_attention") or formats != ["text"]:
        attention = "each document attends only to itself" if manifest.get("document_attention") else "full"
        lines.append(f"formats: {', '.join(formats)}; attention in a sequence: {attention}")
    return "\n".join(lines)


# ---------------------------------------------------------------- cap-prep --show
_COLOURS = {1: "\033[32m", -1: "\033[31m"}  # trained tokens: green +1, red -1
_RESET = "\033[0m"
_BRACKETS = {1: ("[+", "]"), -1: ("[-", "]")}


def show(folder: Path, tok, count: int, colour: bool, split: str = "train") -> str:
    """The first `count` packed sequences of `split`, decoded: each run of trained tokens marked by its
    class (colour, else [+ … ] / [- … ]), "│" where a document starts with document attention."""
    from cap_prep.shards import load_manifest, open_split

    rows = open_split(folder, split)
    pad = load_manifest(folder)["tokenizer"]["pad_id"]
    out = []
    for r in range(min(count, len(rows))):
        ids, classes = rows[r]
        positions = rows.positions([r])[0] if rows.document_attention else None
        n = len(ids)
        while n > 0 and ids[n - 1] == pad and classes[n - 1] == 0:
            n -= 1
        pieces, t = [], 0
        while t < n:
            c = int(classes[t])
            end = t + 1
            while end < n and int(classes[end]) == c and (positions is None or positions[end] != 0):
                end += 1
            text = tok.decode(ids[t:end].tolist(), skip_special_tokens=False)
            if positions is not None and positions[t] == 0 and t > 0:
                pieces.append("│")
            if c == 0:
                pieces.append(text)
            elif colour:
                pieces.append(_COLOURS[c] + text + _RESET)
            else:
                pieces.append(_BRACKETS[c][0] + text + _BRACKETS[c][1])
            t = end
        if n < len(ids):
            pieces.append(f"⟨{len(ids) - n} × pad id {pad}, class 0⟩")
        trained = int((classes != 0).sum())
        out.append(f"--- {split} sequence {r} ({trained} of {len(ids)} tokens train)\n" + "".join(pieces))
    if not out:
        return f"(no {split} sequences)"
    legend = "trained tokens: green +1, red -1" if colour else "trained tokens: [+ … ] class +1, [- … ] class -1"
    return "\n".join(out) + f"\n--- {legend}; other tokens have class 0 (no loss)"
