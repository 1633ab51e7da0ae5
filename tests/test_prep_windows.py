"""Long documents: windowed tokenization (cap_prep/windows.py) gives exactly the whole-text ids.

Windows are made tiny (a few hundred characters, margins of 4 tokens) so that one document is cut
dozens of times, at every kind of place: inside words, whitespace runs longer than the overlap,
newlines, multi-byte and combining characters, literal special-token strings. The reference is
always one tokenizer call on the whole text.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import transformers
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from cap_common.config import config_from_dict
from cap_prep import build, load_manifest, prepare, sources, windows
from cap_prep.tokenize import DocumentEncoder, resolve_options
from tests.assets import sample_text
from tests.test_prep import L, read, reference_pack, reference_tokens

ODD = [
    "   ",
    "\n",
    "\n\n\n",
    "\t",
    " " * 90,
    "\n" * 40,
    "café ",
    "naïve façade",
    "日本語のテキスト",
    "🙂🚀",
    "e\u0301",
    "ﬁne ＡＢＣ",
    "<|eos|>",
    "</s>",
    "x" * 70,
    "  \n  ",
    "\r\n",
    "12345.678",
    "Ω≈ç√",
]


def make_text(seed: int, n: int) -> str:
    """n characters of sentences mixed with the awkward pieces above."""
    rng = random.Random(seed)
    lines = sample_text(300, seed=seed)
    out, size = [], 0
    while size < n:
        piece = rng.choice(lines) if rng.random() < 0.6 else rng.choice(ODD)
        out.append(piece + rng.choice(["", " ", "  "]))
        size += len(out[-1])
    return "".join(out)[:n]


def metaspace_tokenizer(kind: str) -> Tokenizer:
    """A sentencepiece-style tokenizer built offline: NFKC, Metaspace(first), <s> $A </s>."""
    specials = ["<unk>", "<s>", "</s>"]
    if kind == "unigram":
        tok = Tokenizer(models.Unigram())
        trainer = trainers.UnigramTrainer(
            vocab_size=300, special_tokens=specials, unk_token="<unk>", show_progress=False
        )
    else:
        tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
        trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False)
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace("\t", " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    tok.train_from_iterator(sample_text(2000, seed=1), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)])
    return tok


@pytest.fixture(scope="module")
def backends(tiny_model_dir):
    return {
        "byte-level BPE": transformers.AutoTokenizer.from_pretrained(tiny_model_dir("llama")).backend_tokenizer,
        "metaspace unigram": metaspace_tokenizer("unigram"),
        "metaspace BPE": metaspace_tokenizer("bpe"),
    }


def windowed(backend, text, seed: int, stream: bool = False, **sizes) -> list[int]:
    w = windows.Windows(backend, **sizes)
    if stream:  # the text as a .txt reader hands it over: blocks of any size
        rng = random.Random(seed)
        cuts = np.cumsum([0] + [rng.randint(1, 60) for _ in range(len(text))])
        whole = text
        text = (whole[a:b] for a, b in zip(cuts[:-1], cuts[1:]) if a < len(whole))
    return np.concatenate(list(w.encode(text))).tolist()


def check_windows(backend, trials: int, seed0: int = 0) -> int:
    """Windowed == whole for texts of random length and windows of random size; returns extensions seen."""
    extensions = 0
    for t in range(trials):
        rng = random.Random(seed0 + t)
        size = rng.randint(150, 700)
        text = make_text(seed0 + t, rng.randint(size, 14 * size))
        whole = backend.encode(text, add_special_tokens=False).ids
        sizes = dict(window=size, overlap=rng.choice([48, 64, 96]), margin=4, batch_windows=3)
        assert windowed(backend, text, t, **sizes) == whole, (t, sizes)
        assert windowed(backend, text, t, stream=True, **sizes) == whole, (t, sizes)
        w = windows.Windows(backend, **sizes)
        list(w.encode(text))
        extensions += w.extensions
    return extensions


@pytest.mark.parametrize("name", ["byte-level BPE", "metaspace unigram", "metaspace BPE"])
def test_windows_equal_whole_text(name, backends):
    backend = backends[name]
    w = windows.Windows(backend)
    assert w.usable and w.words
    if name != "byte-level BPE":
        assert (w.prefix, w.suffix) == ([1], [2])  # the template's <s> ... </s>
    assert check_windows(backend, trials=12) > 0  # some whitespace runs outgrew the overlap


def test_windows_equal_whole_text_smollm2(smollm2_dir):
    backend = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    assert windows.Windows(backend).usable
    check_windows(backend, trials=6)


def test_windows_without_words_and_with_a_prepend_normalizer():
    """Llama-2-style: no pre-tokenizer (the whole text is one BPE word), Prepend("▁") normalizer."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator([s.replace(" ", "▁") for s in sample_text(2000, seed=1)], trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    assert not windows.Windows(tok).words
    check_windows(tok, trials=8)


@pytest.mark.parametrize("text", ["a" * 3000, " " * 3000, "ab " * 1000 + "\n" * 900 + "z", "🙂" * 1500])
def test_words_longer_than_windows(text, backends):
    """No cut exists inside a word: windows grow (overlap doubling) until one does, still exact."""
    backend = backends["byte-level BPE"]
    w = windows.Windows(backend, window=200, overlap=48, margin=4, batch_windows=3)
    assert np.concatenate(list(w.encode(text))).tolist() == backend.encode(text, add_special_tokens=False).ids
    assert w.extensions > 0


def test_unsupported_post_processor_encodes_whole(backends, tiny_model_dir):
    """A post-processor that is not prefix + text + suffix (here: truncation set) → whole-text encoding."""
    tok = transformers.AutoTokenizer.from_pretrained(tiny_model_dir("llama"))
    tok.backend_tokenizer.enable_truncation(50)
    enc = DocumentEncoder(tok, resolve_options(tok, None, False, "cfg"), None, "cfg")
    assert not enc.windows.usable
    text = make_text(3, 2000)
    out = []
    assert enc.encode_long(text, out.append) == len(np.concatenate(out))
    assert np.concatenate(out).tolist() == enc([text])[0].tolist()


@pytest.mark.parametrize("suffix", [None, "", " The end.", [1, 2]])
@pytest.mark.parametrize("model", ["tiny", "metaspace"])
def test_encode_long_follows_the_document_rule(suffix, model, tiny_model_dir, tmp_path, monkeypatch):
    """encode_long (streamed or not) == the batch path's tokens for the same document."""
    for name, value in (("WINDOW_CHARS", 300), ("OVERLAP_CHARS", 64), ("MARGIN_TOKENS", 4), ("BATCH_WINDOWS", 3)):
        monkeypatch.setattr(windows, name, value)
    tok = transformers.AutoTokenizer.from_pretrained(
        tiny_model_dir("llama") if model == "tiny" else metaspace_folder(tmp_path)
    )
    enc = DocumentEncoder(tok, resolve_options(tok, None, False, "cfg"), suffix, "cfg")
    for seed in range(3):
        text = make_text(seed, 3000)
        if seed == 1:
            text = (tok.bos_token or "") + text  # a literal BOS at the start: only one goes
        expected = enc([text])[0].tolist()
        for source in (text, iter([text[:1000], text[1000:1001], text[1001:]])):
            out = []
            assert enc.encode_long(source, out.append) == len(expected)
            assert np.concatenate(out).tolist() == expected


def metaspace_folder(folder):
    """A model_dir holding the metaspace tokenizer (cap-prep only loads the tokenizer)."""
    target = folder / "metaspace"
    if not (target / "tokenizer.json").exists():
        fast = transformers.PreTrainedTokenizerFast(
            tokenizer_object=metaspace_tokenizer("unigram"), bos_token="<s>", eos_token="</s>", unk_token="<unk>"
        )
        fast.save_pretrained(target)
        (target / "config.json").write_text("{}")
    return target


# ---------------------------------------------------------------- cap-prep end to end
def write_long_inputs(folder, docs: list[str]) -> None:
    """docs over .txt, .json (a list), .json (JSON lines) and .jsonl files, in sorted order."""
    folder.mkdir(parents=True)
    parts = np.array_split(np.arange(len(docs)), 4)
    for k, i in enumerate(parts[0]):
        (folder / f"0-{k:03d}.txt").write_text(docs[i])
    (folder / "1.json").write_text(json.dumps([{"text": docs[i], "n": int(i)} for i in parts[1]], indent=1))
    (folder / "2.json").write_text("\n".join(json.dumps({"text": docs[i]}) for i in parts[2]) + "\n")
    (folder / "3.jsonl").write_text("".join(json.dumps({"text": docs[i]}, ensure_ascii=False) + "\n" for i in parts[3]))


@pytest.mark.parametrize("model", ["tiny", "metaspace"])
def test_prepare_with_long_documents_matches_reference(model, tmp_path, tiny_model_dir, monkeypatch):
    """Long and short documents in every text format: exactly the reference packer's rows."""
    for name, value in (
        ("LONG_DOC_CHARS", 1500),
        ("WINDOW_CHARS", 400),
        ("OVERLAP_CHARS", 64),
        ("MARGIN_TOKENS", 4),
        ("BATCH_WINDOWS", 3),
    ):
        monkeypatch.setattr(windows, name, value)
    monkeypatch.setattr(sources, "READ_BYTES", 257)  # .txt blocks, .json reads grown geometrically
    monkeypatch.setattr(build, "BATCH_DOCS", 3)
    monkeypatch.setattr(build, "CHUNK_BYTES", 3 * 5 * L)
    model_dir = tiny_model_dir("llama") if model == "tiny" else metaspace_folder(tmp_path)
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    rng = random.Random(7)
    pos = [make_text(100 + i, rng.choice([40, 900, 1400, 1600, 4000, 9000])) for i in range(16)]
    neg = [make_text(200 + i, rng.choice([30, 2500, 6000])) for i in range(8)]
    write_long_inputs(tmp_path / "pos", pos)
    write_long_inputs(tmp_path / "neg", neg)
    raw = {
        "model_dir": str(model_dir),
        "output_dir": "out",
        "lr": 1e-4,
        "lora_rank": 2,
        "sequence_len": L,
        "eval_fraction": 0.0,
        "mask_tokens": True,
        "use_control_adapters": True,
        "datasets": [
            {"dataset_path": "pos/*", "control_class": 1},
            {"dataset_path": "neg/*", "control_class": -1, "document_suffix": " The end."},
        ],
    }
    folder = prepare(config_from_dict(raw, tmp_path / "cfg.toml"), quiet=True, shard_bytes=16 * 5 * L)

    masked = set(tok.all_special_ids)
    stream = [
        (t, [0 if x in masked else k for x in t])
        for docs, k, suffix in ((pos, 1, None), (neg, -1, " The end."))
        for t in (reference_tokens(tok, d, suffix) for d in docs)
    ]
    prefix = [tok.bos_token_id]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    expected = reference_pack(stream[: len(pos)], prefix, pad, False) + reference_pack(
        stream[len(pos) :], prefix, pad, False
    )
    ids, cls = read(folder)
    assert ids.tolist() == [r[0] for r in expected]
    assert cls.tolist() == [r[1] for r in expected]
    m = load_manifest(folder)
    assert [d["documents"] for d in m["datasets"]] == [len(pos), len(neg)]
    assert len(m["splits"]["train"]["shards"]) > 1
