"""cap-prep throughput against the bare tokenizer on the same text.

    python -m benchmarks.bench_prep [--mb 64] [--tokenizer PATH] [--keep DIR] [--conversations]

Generates `--mb` megabytes of English-like documents as .jsonl files (with --conversations:
conversations of 2-8 turns in `messages` format, rendered for the bare tokenizer beforehand, untimed,
with transformers' apply_chat_template), then times
1. the bare fast tokenizer: `encode_batch_fast` over the documents, already in memory, in batches
   of cap-prep's size (tokens counted with len(encoding)) — the ceiling;
2. `cap_prep.prepare(cfg, force=True)`: reading the files, hashing them, tokenizing, packing and
   writing the shards (the transformers import is done beforehand and not timed).
and prints tokens/s for both and their ratio (target: cap-prep >= 0.8x the bare tokenizer). With
--conversations it also times 3. `encode_batch`, the tokenizer with the character offsets that
cap-prep needs to find each token's turn, and prints cap-prep's ratio to it.
The tokenizer is the tests' tiny byte-level BPE (with --conversations: its ChatML variant) unless
--tokenizer names a folder with one.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

import numpy as np  # noqa: E402


def make_documents(megabytes: float, seed: int = 0) -> list[str]:
    from tests.assets import sample_text

    lines = sample_text(5000, seed=seed)
    rng = np.random.default_rng(seed)
    docs, size = [], 0
    while size < megabytes * 1e6:
        doc = " ".join(lines[i] for i in rng.integers(0, len(lines), rng.integers(2, 120)))
        docs.append(doc)
        size += len(doc)
    return docs


def make_conversations(megabytes: float, seed: int = 0) -> list[list[dict]]:
    """Conversations of 2-8 turns (an optional system prompt, then user and assistant in turn)."""
    from tests.assets import sample_text

    lines = sample_text(5000, seed=seed)
    rng = np.random.default_rng(seed)
    out, size = [], 0
    while size < megabytes * 1e6:
        turns = [{"role": "system", "content": lines[rng.integers(len(lines))]}] if rng.random() < 0.5 else []
        for t in range(2 * int(rng.integers(1, 5))):
            n = rng.integers(1, 6) if t % 2 == 0 else rng.integers(2, 30)
            content = " ".join(lines[i] for i in rng.integers(0, len(lines), n))
            turns.append({"role": "user" if t % 2 == 0 else "assistant", "content": content})
        out.append(turns)
        size += sum(len(m["content"]) for m in turns)
    return out


def model_folder(work: Path, tokenizer: str | None, chat: bool = False) -> Path:
    """A folder cap's config accepts as model_dir: the tokenizer's files and a config.json."""
    folder = work / "model"
    folder.mkdir()
    if tokenizer is None and chat:
        from tests.assets import chat_tokenizer

        chat_tokenizer("chatml", folder)
    elif tokenizer is None:
        from tests.assets import tiny_tokenizer

        tiny_tokenizer(folder)
    else:
        for f in Path(tokenizer).iterdir():
            if f.is_file() and (
                f.name.startswith("tokenizer")
                or f.suffix in (".model", ".txt")
                or f.name in ("special_tokens_map.json", "vocab.json", "config.json", "chat_template.jinja")
            ):
                shutil.copy(f, folder / f.name)
    if not (folder / "config.json").exists():
        (folder / "config.json").write_text("{}")
    return folder


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=64, help="megabytes of generated text (default 64)")
    ap.add_argument("--tokenizer", default=None, help="folder with a fast tokenizer (default: the tests' tiny one)")
    ap.add_argument("--sequence-len", type=int, default=2048)
    ap.add_argument("--keep", default=None, help="work folder to keep (default: a temp folder, removed)")
    ap.add_argument("--conversations", action="store_true", help="messages data through the chat template")
    ap.add_argument("--repeat", type=int, default=3, help="interleaved runs of each; medians are reported")
    args = ap.parse_args()

    import transformers

    from cap_common.config import config_from_dict
    from cap_prep import build, load_manifest, prepare

    work = Path(args.keep or tempfile.mkdtemp(prefix="bench-prep-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        model = model_folder(work, args.tokenizer, args.conversations)
        tok = transformers.AutoTokenizer.from_pretrained(model)
        records = make_conversations(args.mb) if args.conversations else make_documents(args.mb)
        key = "messages" if args.conversations else "text"
        data = work / "data"
        data.mkdir()
        for i, part in enumerate(np.array_split(np.arange(len(records)), 8)):
            with open(data / f"part-{i}.jsonl", "w") as f:
                f.writelines(json.dumps({key: records[j]}) + "\n" for j in part)
        if args.conversations:  # the bare tokenizer's input: the rendered conversations (not timed)
            docs = [tok.apply_chat_template(c, tokenize=False) for c in records]
            special = False  # apply_chat_template tokenizes without adding special tokens
        else:
            docs, special = records, True
        mb = sum(len(d) for d in docs) / 1e6
        print(
            f"text: {mb:.1f} MB in {len(docs):,} {'conversations (rendered)' if args.conversations else 'documents'}; "
            f"cores: {os.cpu_count()}; tokenizer: {args.tokenizer or 'tests/assets tiny BPE'}"
        )

        encode = tok.backend_tokenizer.encode_batch_fast
        raw = {
            "model_dir": str(model),
            "output_dir": str(work / "out"),
            "lr": 1e-4,
            "lora_rank": 1,
            "sequence_len": args.sequence_len,
            "eval_fraction": 0.01,
            "datasets": [{"dataset_path": str(data / "*.jsonl")}],
        }
        cfg = config_from_dict(raw, work / "cfg.toml")

        def bare(encode=encode) -> tuple[int, float]:
            t0, tokens = time.perf_counter(), 0
            for i in range(0, len(docs), build.BATCH_DOCS):
                tokens += sum(len(e) for e in encode(docs[i : i + build.BATCH_DOCS], add_special_tokens=special))
            return tokens, time.perf_counter() - t0

        def cap_prep() -> tuple[int, float]:
            t0 = time.perf_counter()
            m = load_manifest(prepare(cfg, force=True, quiet=True))
            return sum(d[s]["tokens"] for d in m["datasets"] for s in ("train", "eval")), time.perf_counter() - t0

        times = {"bare": [], "prep": [], "offsets": []}
        for _ in range(args.repeat):  # interleaved, so all see the same machine
            bare_tokens, t = bare()
            times["bare"].append(t)
            prep_tokens, t = cap_prep()
            times["prep"].append(t)
            if args.conversations:  # the tokenizer with the character offsets that find trained tokens
                times["offsets"].append(bare(tok.backend_tokenizer.encode_batch)[1])
        bare_s, prep_s = (float(np.median(times[k])) for k in ("bare", "prep"))

        def seconds(ts: list[float]) -> str:
            return ", ".join(f"{t:.1f}" for t in ts)

        bare_rate, prep_rate = bare_tokens / bare_s, prep_tokens / prep_s
        print(
            f"bare tokenizer (encode_batch_fast, in memory): {bare_tokens:,} tokens in {bare_s:.1f} s = "
            f"{bare_rate / 1e6:.2f} M tokens/s (median of {args.repeat}: {seconds(times['bare'])})"
        )
        print(
            f"cap-prep (read + hash + tokenize + pack + write): {prep_tokens:,} tokens in {prep_s:.1f} s = "
            f"{prep_rate / 1e6:.2f} M tokens/s (median of {args.repeat}: {seconds(times['prep'])})"
        )
        ratios = [times["bare"][k] / times["prep"][k] * prep_tokens / bare_tokens for k in range(args.repeat)]
        print(
            f"ratio cap-prep / bare: {prep_rate / bare_rate:.2f} (target >= 0.8; per pair: "
            f"{', '.join(f'{r:.2f}' for r in ratios)})"
        )
        if args.conversations:
            offsets_s = float(np.median(times["offsets"]))
            print(
                f"bare tokenizer with offsets (encode_batch, what finding the trained tokens needs): {offsets_s:.1f} s "
                f"(median of {args.repeat}: {seconds(times['offsets'])}); ratio cap-prep / it: "
                f"{offsets_s / prep_s * prep_tokens / bare_tokens:.2f}"
            )
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
