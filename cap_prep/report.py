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
        if ds.get("max_tokens_dropped_documents"):
            lines.append(
                f"{_short(ds['dataset_path'])}: max_tokens = {ds['max_tokens']:,} kept "
                f"{ds['documents'] - ds['max_tokens_dropped_documents']:,} of {ds['documents']:,} documents "
                f"({ds['max_tokens_dropped_tokens']:,} tokens dropped)"
            )
    return "\n".join(lines)
