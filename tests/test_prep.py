"""cap-prep packing, checked token by token against an independent re-tokenization and packer.

The reference here calls the tokenizer directly (transformers, one document at a time) and packs
with a plain Python loop over tokens, following the rules written in cap_prep/pack.py and
cap_prep/tokenize.py; cap-prep's vectorised pipeline must produce exactly the same rows.
Batches, pack steps and shards are made tiny so that every boundary is crossed many times.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.ipc
import pyarrow.parquet as pq
import pytest
import transformers

from cap_common.config import config_from_dict
from cap_prep import build, load_manifest, open_split, prepare
from tests.assets import sample_text

L = 24


# ---------------------------------------------------------------- fixtures and helpers
def documents(n: int, seed: int) -> list[str]:
    """n documents of 1 to 12 sentences: some far shorter, some longer than a sequence."""
    lines = sample_text(400, seed=seed)
    rng = np.random.default_rng(seed)
    return [" ".join(lines[j] for j in rng.integers(0, len(lines), rng.integers(1, 13))) for _ in range(n)]


def write_all_formats(folder, docs: list[str]) -> None:
    """Spread docs over every format, in files whose sorted order is the documents' order."""
    folder.mkdir(parents=True, exist_ok=True)
    parts = np.array_split(np.arange(len(docs)), 5)
    if len(parts[0]):
        (folder / "0.json").write_text(json.dumps([{"text": docs[i], "id": int(i)} for i in parts[0]]))
    if len(parts[1]):
        (folder / "1.jsonl").write_text("".join(json.dumps({"text": docs[i]}) + "\n\n" for i in parts[1]))
    if len(parts[2]):
        pq.write_table(pa.table({"text": [docs[i] for i in parts[2]]}), folder / "2.parquet")
    for k, i in enumerate(parts[3]):
        (folder / f"3-{k:03d}.txt").write_text(docs[i])
    if len(parts[4]):
        (folder / "4.jsonl").write_text("\n".join(json.dumps({"text": docs[i]}) for i in parts[4]))


def required_keys(model) -> dict:
    """The keys every cap-prep test config has: control adapters, sequence_len L, no eval split."""
    return {
        "model_dir": str(model),
        "output_dir": "out",
        "lr": 1e-4,
        "lora_rank": 2,
        "use_control_adapters": True,
        "sequence_len": L,
        "eval_fraction": 0.0,
    }


@pytest.fixture
def make(tmp_path, tiny_model_dir, monkeypatch):
    """make(datasets, **keys) -> Config; datasets are (docs, {dataset keys}) pairs."""
    model = tiny_model_dir("llama")
    monkeypatch.setattr(build, "BATCH_DOCS", 7)
    monkeypatch.setattr(build, "CHUNK_BYTES", 3 * 5 * L)  # three rows per pack step

    def cfg(datasets, **keys):
        tables = []
        for i, (docs, extra) in enumerate(datasets):
            write_all_formats(tmp_path / f"data{i}", docs)
            tables.append({"dataset_path": f"data{i}/*", **extra})
        return config_from_dict({**required_keys(model), **keys, "datasets": tables}, tmp_path / "cfg.toml")

    return cfg


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return transformers.AutoTokenizer.from_pretrained(tiny_model_dir("llama"))


def write_config(folder, model, datasets: list[dict], **keys):
    """A cfg.toml in `folder` with the required keys, `keys` and one [[datasets]] table per dict."""
    raw = {**required_keys(model), **keys}
    lines = [f"{k} = {json.dumps(v)}" for k, v in raw.items()]
    for table in datasets:
        lines += ["[[datasets]]"] + [f"{k} = {json.dumps(v)}" for k, v in table.items()]
    path = folder / "cfg.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def reference_tokens(tok, text: str, suffix) -> list[int]:
    """A document's tokens by the documented rule, from a direct tokenizer call."""
    ids = tok(text + (suffix if isinstance(suffix, str) else ""))["input_ids"]
    if ids and ids[0] == tok.bos_token_id:
        ids = ids[1:]
    if suffix is None and ids[-1:] != [tok.eos_token_id]:
        ids = ids + [tok.eos_token_id]
    elif isinstance(suffix, list):
        ids = ids + suffix
    return ids


def reference_pack(docs, prefix: list[int], pad: int, drop_tails: bool) -> list[tuple[list, list]]:
    """docs: (tokens, classes) in stream order → (input_ids, control_class) rows; a loop per token."""
    rows, ids, cls = [], list(prefix), [0] * len(prefix)
    for tokens, classes in docs:
        for t, c in zip(tokens, classes):
            ids.append(t)
            cls.append(c)
            if len(ids) == L:
                rows.append((ids, cls))
                ids, cls = list(prefix), [0] * len(prefix)
                if drop_tails:
                    break
    if len(ids) > len(prefix):
        rows.append((ids + [pad] * (L - len(ids)), cls + [0] * (L - len(cls))))
    return rows


def read(folder, split="train"):
    s = open_split(folder, split)
    if not len(s):
        return np.zeros((0, L), np.int32), np.zeros((0, L), np.int8)
    return np.concatenate(s.input_ids), np.concatenate(s.control_class)


def bodies(ids, cls, prefix_len):
    """The token stream of a split: all row bodies, padding removed (class 0 and pad id at the end)."""
    return ids[:, prefix_len:].reshape(-1), cls[:, prefix_len:].reshape(-1)


# ---------------------------------------------------------------- exact packing
CASES = {
    "defaults": dict(),
    "drop_tails": dict(keys={"drop_tails": True}),
    "no prefix, no suffix": dict(keys={"sequence_prefix": ""}, suffix=""),
    "string prefix and suffix": dict(keys={"sequence_prefix": "Once upon"}, suffix=" The end."),
    "id prefix, id suffix, mask all special": dict(
        keys={"sequence_prefix": [5, 6], "mask_tokens": True}, suffix=[1, 2]
    ),
    "mask ids, drop_tails, suffix is eos": dict(keys={"mask_tokens": [1, 40, 41], "drop_tails": True}, suffix=1),
    "long prefix": dict(keys={"sequence_prefix": list(range(10, 10 + L - 1))}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_packing_matches_reference(case, make, tok):
    spec = CASES[case]
    suffix = spec.get("suffix")
    pos = documents(23, seed=1) + ["A <|pad|> inside. <|eos|>", "x"]
    neg = documents(9, seed=2)
    extra = {} if suffix is None else {"document_suffix": suffix}
    cfg = make([(pos, {"control_class": 1, **extra}), (neg, {"control_class": -1, **extra})], **spec.get("keys", {}))
    folder = prepare(cfg, quiet=True, shard_bytes=16 * 5 * L)
    manifest = load_manifest(folder)

    prefix = manifest["prefix_ids"]
    if cfg.sequence_prefix is None:
        assert prefix == [tok.bos_token_id]
    elif isinstance(cfg.sequence_prefix, str):
        assert prefix == tok(cfg.sequence_prefix, add_special_tokens=False)["input_ids"]
    else:
        assert prefix == list(cfg.sequence_prefix)
    masked = set(tok.all_special_ids) if cfg.mask_tokens is True else set(cfg.mask_tokens or ())
    suffix_ref = [suffix] if isinstance(suffix, int) else suffix
    expected = []
    for docs, klass in ((pos, 1), (neg, -1)):
        stream = []
        for text in docs:
            t = reference_tokens(tok, text, suffix_ref)
            stream.append((t, [0 if x in masked else klass for x in t]))
        expected += reference_pack(stream, prefix, tok.pad_token_id, cfg.drop_tails)
    ids, cls = read(folder)
    assert ids.tolist() == [r[0] for r in expected]
    assert cls.tolist() == [r[1] for r in expected]
    assert len(manifest["splits"]["train"]["shards"]) > 1
    assert manifest["splits"]["eval"]["sequences"] == 0 and manifest["splits"]["eval"]["shards"] == []


def test_drop_tails_counts(make, tok):
    docs = documents(30, seed=3)
    cfg = make([(docs, {})], drop_tails=True)
    m = load_manifest(prepare(cfg, quiet=True))
    lengths = [len(reference_tokens(tok, t, None)) for t in docs]
    tails, tokens, fill = 0, 0, 0  # the documented rule, walked by hand
    for n in lengths:
        if fill + n >= L - 1:
            cut = fill + n - (L - 1)
            tails, tokens, fill = tails + (cut > 0), tokens + cut, 0
        else:
            fill += n
    train = m["datasets"][0]["train"]
    assert (train["dropped_tails"], train["dropped_tail_tokens"]) == (tails, tokens) and tails > 0
    assert train["tokens"] == sum(lengths) - tokens


def test_add_prefix_space(make, tok):
    docs = documents(5, seed=4)
    cfg = make([(docs, {})], add_prefix_space=True, sequence_prefix="")
    ids, _ = read(prepare(cfg, quiet=True))
    stream = sum((reference_tokens(tok, " " + t, None) for t in docs), [])
    assert ids.reshape(-1)[: len(stream)].tolist() == stream
    assert stream != sum((reference_tokens(tok, t, None) for t in docs), [])


# ---------------------------------------------------------------- mixing, classes, caps, eval
def find_documents(stream: np.ndarray, tok, docs: list[str]) -> dict[int, int]:
    """Position in `stream` of every document found whole in it, by exact token match."""
    data = stream.astype(np.int32).tobytes()
    found = {}
    for i, text in enumerate(docs):
        at = data.find(np.asarray(reference_tokens(tok, text, None), np.int32).tobytes())
        while at >= 0 and at % 4:
            at = data.find(np.asarray(reference_tokens(tok, text, None), np.int32).tobytes(), at + 1)
        if at >= 0:
            found[i] = at // 4
    return found


@pytest.mark.parametrize("mix", [False, True])
def test_mix_datasets(mix, make, tok):
    pos, neg = documents(30, seed=5), documents(30, seed=6)
    cfg = make([(pos, {"control_class": 1}), (neg, {"control_class": -1})], mix_datasets=mix)
    ids, cls = read(prepare(cfg, quiet=True))
    stream, classes = bodies(ids, cls, 1)
    for docs, klass in ((pos, 1), (neg, -1)):
        found = find_documents(stream, tok, docs)
        assert len(found) == len(docs)  # every document, whole and in order
        for i, at in found.items():
            n = len(reference_tokens(tok, docs[i], None))
            assert (classes[at : at + n] == klass).all()
    n_tokens = sum(len(reference_tokens(tok, t, None)) for t in pos + neg)
    assert (classes != 0).sum() == n_tokens  # nothing else, nothing twice
    has_both = ((cls == 1).any(1) & (cls == -1).any(1)).sum()
    padded = (ids[:, -1] == tok.pad_token_id).sum()
    if mix:
        assert has_both > 1 and padded <= 1
    else:
        assert has_both == 0 and padded <= 2  # only each dataset's last sequence


def test_neutral_class(make, tok):
    docs = documents(40, seed=7)
    cfg = make([(docs, {"control_class": 0})], seed=3)
    ids, cls = read(prepare(cfg, quiet=True))
    stream, classes = bodies(ids, cls, 1)
    found = find_documents(stream, tok, docs)
    per_doc = [set(classes[at : at + len(reference_tokens(tok, docs[i], None))].tolist()) for i, at in found.items()]
    assert all(len(c) == 1 and c <= {1, -1} for c in per_doc)
    assert {c.pop() for c in per_doc} == {1, -1}
    again = read(prepare(cfg, quiet=True, force=True))[1]
    assert (again == cls).all()


def test_max_sequences_keeps_a_subset(make):
    docs = documents(60, seed=8)
    full_ids, _ = read(prepare(make([(docs, {})]), quiet=True))
    cfg = make([(docs, {})], max_sequences=10)
    m = load_manifest(prepare(cfg, quiet=True))
    ids, _ = read(prepare(cfg, quiet=True))
    assert len(ids) == 10 == m["splits"]["train"]["sequences"]
    assert m["splits"]["train"]["sequences_before_max"] == len(full_ids) > 10
    rows = [r.tobytes() for r in full_ids]
    at = [rows.index(r.tobytes()) for r in ids]
    assert at == sorted(at) and len(set(at)) == 10  # a subset, kept in packing order


def test_eval_split_whole_documents(make, tok):
    docs = [f"Document {i}: " + t for i, t in enumerate(documents(40, seed=9))]
    cfg = make([(docs, {}), (["Only one."], {}), (documents(3, seed=13), {})], eval_fraction=0.1)
    folder = prepare(cfg, quiet=True)
    m = load_manifest(folder)
    train = find_documents(bodies(*read(folder, "train"), 1)[0], tok, docs)
    held = find_documents(bodies(*read(folder, "eval"), 1)[0], tok, docs)
    assert len(held) == 4 and len(train) == 36 and not set(train) & set(held)
    assert [d["eval"]["documents"] for d in m["datasets"]] == [4, 0, 1]  # at least one, never all
    assert [d["train"]["documents"] for d in m["datasets"]] == [36, 1, 2]
    again = read(prepare(cfg, quiet=True, force=True), "eval")[0]
    assert (again == read(folder, "eval")[0]).all()  # deterministic ...
    other = prepare(make([(docs, {})], eval_fraction=0.1, seed=7), quiet=True)
    assert set(find_documents(bodies(*read(other, "eval"), 1)[0], tok, docs)) != set(held)  # ... from the seed


def test_manifest_counts_match_shards(make, tok, tmp_path):
    pos = documents(20, seed=10) + ["Masked <|eos|> token."]
    cfg = make(
        [(pos, {"control_class": 1}), (documents(15, seed=11), {"control_class": -1})],
        mask_tokens=True,
        drop_tails=True,
        eval_fraction=0.2,
    )
    folder = prepare(cfg, quiet=True, shard_bytes=3 * 5 * L)
    m = load_manifest(folder)
    for split in ("train", "eval"):
        ids, cls = read(folder, split)
        s = m["splits"][split]
        assert sum(sh["rows"] for sh in s["shards"]) == s["sequences"] == len(ids) == len(open_split(folder, split))
        for sh in s["shards"]:
            assert sh["bytes"] == (folder / sh["file"]).stat().st_size
            assert sh["rows"] <= 3
        assert s["loss_tokens"] == {"+1": int((cls == 1).sum()), "-1": int((cls == -1).sum())}
        assert s["padding_tokens"] == int((ids[:, 1:] == tok.pad_token_id).sum())  # pad id is masked too
        assert s["tokens"] + s["padding_tokens"] + s["prefix_tokens"] == ids.size
        assert s["tokens"] - s["masked_tokens"] == int((cls != 0).sum())
        per = [d[split] for d in m["datasets"]]
        assert [p["tokens"] - p["masked_tokens"] for p in per] == [s["loss_tokens"]["+1"], s["loss_tokens"]["-1"]]
        assert [p["sequences"] for p in per] == [int((cls == 1).any(1).sum()), int((cls == -1).any(1).sum())]
    assert m["splits"]["train"]["masked_tokens"] > 0
    assert m["sequence_len"] == L and m["tokenizer"]["vocab_size"] == len(tok)


# ---------------------------------------------------------------- the Arrow contract
def test_shards_are_zero_copy_arrow(make):
    folder = prepare(make([(documents(30, seed=12), {})]), quiet=True, shard_bytes=4 * 5 * L)
    path = folder / "train-00001.arrow"
    before = pa.total_allocated_bytes()
    with pa.memory_map(str(path)) as source:
        reader = pa.ipc.open_file(source)
        assert reader.schema.field("input_ids").type == pa.list_(pa.field("item", pa.int32(), False), L)
        assert reader.schema.field("control_class").type == pa.list_(pa.field("item", pa.int8(), False), L)
        table = reader.read_all()
        chunk = table.column("input_ids").chunk(0)
        ids = chunk.values.to_numpy(zero_copy_only=True)
        assert ids.dtype == np.int32 and len(ids) == len(chunk) * L
        assert pa.total_allocated_bytes() == before  # nothing was copied into memory
    split = open_split(folder, "train")
    assert not split.input_ids[0].flags.owndata and not split.input_ids[0].flags.writeable
    assert pa.total_allocated_bytes() == before
    rows = np.concatenate(split.input_ids)
    assert all((split[r][0] == rows[r]).all() for r in range(len(split)))
    pick = [len(split) - 1, 0, 5, 4]
    assert (split.rows(pick)[0] == rows[pick]).all()


def test_json_lines_in_a_json_file_and_empty_documents(make, tok, tmp_path):
    cfg = make([(documents(4, seed=14), {})], sequence_prefix="")
    folder = tmp_path / "data0"
    (folder / "0.json").write_text('{"text": "First."}\n{"text": ""}\n{"text": "Second."}\n')  # JSON lines
    (folder / "3-000.txt").write_text("")  # an empty document
    m = load_manifest(prepare(cfg, quiet=True))
    ids, _ = read(prepare(cfg, quiet=True))
    first = reference_tokens(tok, "First.", None) + reference_tokens(tok, "Second.", None)
    assert ids.reshape(-1)[: len(first)].tolist() == first
    assert m["datasets"][0]["empty_documents"] == 2
    assert m["datasets"][0]["documents"] == 4 - 1 - 1 + 2  # 0.json held docs 0; 3-000.txt was doc 3
