"""cap-prep on conversation data: the packed ids are transformers' apply_chat_template output, token for
token, and the trained tokens are exactly the trained turns' (content and end-of-turn token), computed
here independently from renders of each conversation's prefixes and the tokenizer's character offsets.

Templates: Llama-3, ChatML (Qwen2) and Gemma formats (tests/assets.py; Gemma's on a SentencePiece-style
tokenizer), and SmolLM2-135M-Instruct's own template. Formats: messages, ShareGPT, Alpaca, prompt/completion.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import transformers

from cap_common.config import load_config
from cap_prep.build import prepare
from cap_prep.shards import load_manifest, open_split
from tests.assets import chat_tokenizer

CONVERSATIONS = [
    [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "Tell me about the sea."},
        {"role": "assistant", "content": "The sea is wide and the wind is strong."},
    ],
    [
        {"role": "user", "content": "What is a fox?"},
        {"role": "assistant", "content": " A quick brown animal, é and — 😀!  "},
        {"role": "user", "content": "And a dog?"},
        {"role": "assistant", "content": "A lazy one, always.\nIt sleeps."},
    ],
    [
        {"role": "user", "content": "Red or blue?"},
        {"role": "assistant", "content": "Blue, because the river is blue."},
    ],
]


def _config(folder, model_dir, datasets: str, extra: str = "") -> object:
    cfg = folder / "cfg.toml"
    cfg.write_text(
        f"model_dir = '{model_dir}'\noutput_dir = '{folder / 'out'}'\nlr = 1e-4\nlora_rank = 4\n"
        f"sequence_len = 96\neval_fraction = 0\n{extra}\n{datasets}"
    )
    return cfg


def _write(folder, fmt: str, conversations) -> str:
    """The conversations in format `fmt` (each as its own format writes it); returns the file name."""
    if fmt == "messages":
        path = folder / "chat.jsonl"
        path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations))
    elif fmt == "sharegpt":
        names = {"system": "system", "user": "human", "assistant": "gpt"}
        records = [
            {"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in c]} for c in conversations
        ]
        path = folder / "chat.json"
        path.write_text(json.dumps(records))
    elif fmt == "alpaca":
        rows = []
        for c in conversations:
            system = [m["content"] for m in c if m["role"] == "system"]
            user, assistant = [m for m in c if m["role"] != "system"][:2]
            rows.append(
                {"instruction": user["content"], "output": assistant["content"], "system": (system or [None])[0]}
            )
        path = folder / "chat.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        path = folder / "chat.jsonl"
        path.write_text(
            "".join(
                json.dumps({"prompt": c[-2]["content"], "completion": c[-1]["content"]}) + "\n" for c in conversations
            )
        )
    return path.name


def _as_format(fmt: str, conversations):
    """The conversations each format can hold: Alpaca one system/user/assistant exchange, prompt/completion
    one user/assistant exchange (each the first, resp. last of the conversation)."""
    if fmt == "alpaca":
        return [
            [m for m in c if m["role"] == "system"] + [m for m in c if m["role"] != "system"][:2] for c in conversations
        ]
    if fmt == "prompt_completion":
        return [c[-2:] for c in conversations]
    return conversations


def reference(tok, messages, train=None):
    """(ids, trained [T] bool) of one conversation, from transformers alone: ids = apply_chat_template;
    turn i trains from its content's first non-space character, found after the render of messages[:i],
    to the end of the render of messages[:i+1] without its trailing whitespace; a token trains when
    its character offsets overlap such a span."""
    ids = tok.apply_chat_template(messages, tokenize=True, return_dict=False)
    text = tok.apply_chat_template(messages, tokenize=False)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    assert enc["input_ids"] == ids
    trained = np.zeros(len(ids), dtype=bool)
    for i, m in enumerate(messages):
        if not (m["role"] == "assistant" if train is None else train[i]):
            continue
        head = tok.apply_chat_template(messages[:i], tokenize=False) if i else ""
        upto = tok.apply_chat_template(messages[: i + 1], tokenize=False).rstrip()
        assert text.startswith(head) and text.startswith(upto)
        start = text.index(m["content"].strip(), len(head))
        for t, (s, e) in enumerate(enc["offset_mapping"]):
            if e > start and s < len(upto):
                trained[t] = True
    return ids, trained


def _stream(folder):
    """The train split's tokens and classes laid end to end, the last row's padding cut."""
    rows = open_split(folder, "train")
    manifest = load_manifest(folder)
    real = manifest["splits"]["train"]["tokens"]
    ids = np.concatenate([rows[r][0] for r in range(len(rows))])[:real]
    classes = np.concatenate([rows[r][1] for r in range(len(rows))])[:real]
    return ids, classes, rows


@pytest.fixture(scope="module")
def chat_models(tmp_path_factory, tiny_model_dir):
    """model folders: the tiny llama weights with each family's chat tokenizer (cap-prep reads only the tokenizer)."""
    import shutil

    base = tiny_model_dir("llama")
    out = {}
    for family in ("llama3", "chatml", "gemma"):
        folder = tmp_path_factory.mktemp(family)
        shutil.copy(base / "config.json", folder / "config.json")
        out[family] = chat_tokenizer(family, folder)
    return out


@pytest.mark.parametrize("family", ["llama3", "chatml", "gemma"])
@pytest.mark.parametrize("fmt", ["messages", "sharegpt", "alpaca", "prompt_completion"])
def test_packed_ids_and_trained_tokens_match_transformers(tmp_path, chat_models, family, fmt):
    model_dir = chat_models[family]
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    conversations = _as_format(fmt, CONVERSATIONS)
    name = _write(tmp_path, fmt, CONVERSATIONS)
    cfg = load_config(_config(tmp_path, model_dir, f"[[datasets]]\ndataset_path = '{name}'\n"))
    folder = prepare(cfg, quiet=True)
    manifest = load_manifest(folder)
    assert manifest["datasets"][0]["format"] == fmt and manifest["document_attention"] is True
    ids, classes, rows = _stream(folder)
    refs = [reference(tok, c) for c in conversations]
    np.testing.assert_array_equal(ids, np.concatenate([r[0] for r in refs]))
    np.testing.assert_array_equal(classes != 0, np.concatenate([r[1] for r in refs]))
    assert set(np.unique(classes)) == {0, 1}
    # positions restart at every conversation (and at every row)
    positions = np.concatenate([rows.positions([r])[0] for r in range(len(rows))])[: len(ids)]
    starts = np.cumsum([0] + [len(r[0]) for r in refs])[:-1]
    expected = np.concatenate([np.arange(len(r[0])) for r in refs])
    row_start = np.arange(len(ids)) // 96 * 96
    doc_start = np.repeat(starts, [len(r[0]) for r in refs])
    expected = np.arange(len(ids)) - np.maximum(doc_start, row_start)
    np.testing.assert_array_equal(positions, expected)


MORE = [  # the byte path meets multi-byte characters at a turn's edges and inside tokens
    [
        {"role": "user", "content": "Ça va? Привет!"},
        {"role": "assistant", "content": "Très bien — 谢谢, and you? 😀😀"},
    ],
    [
        {"role": "system", "content": "Réponds en français."},
        {"role": "user", "content": "naïve café"},
        {"role": "assistant", "content": "  é  "},
        {"role": "user", "content": "🙂"},
        {"role": "assistant", "content": "日本語のテキスト。\n\nDone."},
    ],
]


@pytest.mark.parametrize("family", ["llama3", "chatml", "gemma"])
def test_many_batches_byte_path_matches_offsets(tmp_path, chat_models, family, monkeypatch):
    """One conversation per tokenizer batch, so every later batch takes the path the first one chose: for
    byte-level BPE (Llama-3, ChatML) the tokens' byte lengths without offsets, for Gemma's SentencePiece-style
    tokenizer the offsets; either way the ids and trained tokens are transformers' (reference)."""
    import cap_prep.build
    from cap_prep.chat import ChatEncoder

    monkeypatch.setattr(cap_prep.build, "CHAT_BATCH_CHARS", 1)
    paths = []
    to_arrays = ChatEncoder.to_arrays

    def recording(self, encodings, texts, spans, offsets):
        paths.append(offsets)
        return to_arrays(self, encodings, texts, spans, offsets)

    monkeypatch.setattr(ChatEncoder, "to_arrays", recording)
    conversations = (CONVERSATIONS + MORE) * 3
    model_dir = chat_models[family]
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    name = _write(tmp_path, "messages", conversations)
    cfg = load_config(_config(tmp_path, model_dir, f"[[datasets]]\ndataset_path = '{name}'\n"))
    ids, classes, _ = _stream(prepare(cfg, quiet=True))
    refs = [reference(tok, c) for c in conversations]
    np.testing.assert_array_equal(ids, np.concatenate([r[0] for r in refs]))
    np.testing.assert_array_equal(classes != 0, np.concatenate([r[1] for r in refs]))
    # the first batch with offsets; the second is tokenized while the first is compared, so either way
    assert len(paths) == len(conversations) and paths[0]
    assert paths[2:] == [family == "gemma"] * (len(conversations) - 2)


def test_byte_path_falls_back_to_offsets_where_bytes_do_not_add_up(chat_models):
    """A conversation whose tokens' byte lengths do not add up to its text's (simulated: one token's length
    made wrong) is tokenized again with offsets; the others in its batch keep their byte-path flags."""
    from cap_prep.chat import ChatEncoder, Extract, Fields, load_template
    from cap_prep.tokenize import flat_ids

    tok = transformers.AutoTokenizer.from_pretrained(chat_models["chatml"])
    assert ChatEncoder(tok, "", None, len(tok), "x").byte_length is not None
    gemma = transformers.AutoTokenizer.from_pretrained(chat_models["gemma"])
    assert ChatEncoder(gemma, "", None, len(gemma), "x").byte_length is None
    enc = ChatEncoder(tok, load_template(tok, None, chat_models["chatml"]), None, len(tok), "x")
    extract = Extract("messages", Fields(None), ("assistant",))
    conversations = CONVERSATIONS + MORE[:1]
    rendered = [enc.text_and_spans(extract({"messages": c}, "x")) for c in conversations]
    enc.by_bytes = True
    odd = tok("—", add_special_tokens=False).input_ids[0]  # in conversations 1 and 3 only
    assert [odd in r[0] for r in (reference(tok, c) for c in conversations)] == [False, True, False, True]
    enc.byte_length = enc.byte_length.copy()
    enc.byte_length[odd] += 1
    encodings, texts, spans, offsets = enc.encode_texts(rendered)
    assert not offsets
    flat, lengths = flat_ids(encodings)
    _, bad = enc._by_bytes(flat, np.concatenate([[0], np.cumsum(lengths)]), texts, spans)
    assert bad.tolist() == [False, True, False, True]
    ids, lengths, trained, skipped = enc.to_arrays(encodings, texts, spans, offsets)
    refs = [reference(tok, c) for c in conversations]
    np.testing.assert_array_equal(ids, np.concatenate([r[0] for r in refs]))
    np.testing.assert_array_equal(trained, np.concatenate([r[1] for r in refs]))
    assert lengths.tolist() == [len(r[0]) for r in refs] and skipped == 0


def test_smollm2_template_train_flags_and_classes(tmp_path, smollm2_dir):
    """SmolLM2-135M-Instruct's own template (ChatML with a default system prompt); a message's "train" flag
    overrides its role, train_roles chooses the roles, and control_class -1 gives the trained tokens -1."""
    tok = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    convs = [c for c in CONVERSATIONS]
    flagged = [dict(m) for m in CONVERSATIONS[1]]
    flagged[1]["train"] = False  # the first answer does not train
    flagged[2]["train"] = True  # a user turn does
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in [convs[0], flagged, convs[2]]))
    cfg = load_config(
        _config(
            tmp_path,
            smollm2_dir,
            "[[datasets]]\ndataset_path = 'chat.jsonl'\ncontrol_class = -1\n",
            "use_control_adapters = true",
        )
    )
    ids, classes, _ = _stream(prepare(cfg, quiet=True))
    plain = [{k: v for k, v in m.items() if k != "train"} for m in flagged]
    refs = [
        reference(tok, convs[0]),
        reference(tok, plain, [m["role"] == "assistant" if "train" not in m else m["train"] for m in flagged]),
        reference(tok, convs[2]),
    ]
    np.testing.assert_array_equal(ids, np.concatenate([r[0] for r in refs]))
    np.testing.assert_array_equal(classes, -np.concatenate([r[1] for r in refs]).astype(np.int8))

    # train_roles = ['user', 'assistant']: both roles' turns train
    cfg = load_config(
        _config(
            tmp_path, smollm2_dir, "[[datasets]]\ndataset_path = 'chat.jsonl'\n", "train_roles = ['user', 'assistant']"
        )
    )
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    ids, classes, _ = _stream(prepare(cfg, quiet=True))
    refs = [reference(tok, c, [m["role"] in ("user", "assistant") for m in c]) for c in convs]
    np.testing.assert_array_equal(classes, np.concatenate([r[1] for r in refs]).astype(np.int8))


def _cli(cfg, *args):
    return subprocess.run(
        [sys.executable, "-m", "cap_prep.cli", str(cfg), *args], capture_output=True, text=True, timeout=300
    )


def _cli_in_process(cfg, *args) -> subprocess.CompletedProcess:
    """cap-prep's CLI run in this process (click's runner): its exit code, stdout and stderr, without the
    seconds of a new interpreter's imports, for runs that end at an error."""
    from click.testing import CliRunner

    from cap_prep.cli import main

    r = CliRunner().invoke(main, [str(cfg), *args])
    return subprocess.CompletedProcess(["cap-prep", str(cfg), *args], r.exit_code, r.stdout, r.stderr)


def test_bad_conversations_one_line_each(tmp_path, chat_models):
    model_dir = chat_models["gemma"]
    cases = {
        "role": ({"messages": [{"role": "wizard", "content": "x"}]}, "record 1: message 0: unknown role 'wizard'"),
        "fields": ({"messages": [{"role": "user"}]}, 'record 1: message 0: "content" is missing, expected a string'),
        "template": (
            {"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "x"}]},
            "record 1: the chat template failed: Conversation roles must alternate",
        ),
    }
    good = {"messages": CONVERSATIONS[2]}
    for name, (bad, expected) in cases.items():
        (tmp_path / "d.json").write_text(json.dumps([good, bad]))
        cfg = _config(tmp_path, model_dir, "[[datasets]]\ndataset_path = 'd.json'\n")
        r = _cli_in_process(cfg)
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0] and "d.json" in lines[0], (name, r.stderr)
        assert not list((tmp_path / "out" / "prepared").glob("[0-9a-f]*[0-9a-f]")), "nothing half-written"
    # a model without a chat template
    plain = tmp_path / "plain"
    plain.mkdir()
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    tok.chat_template = None
    tok.save_pretrained(plain)
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    (plain / "config.json").write_text((model_dir / "config.json").read_text())
    (tmp_path / "d.json").write_text(json.dumps([good]))
    r = _cli_in_process(_config(tmp_path, plain, "[[datasets]]\ndataset_path = 'd.json'\n"))
    assert r.returncode == 2 and "has no chat template" in r.stderr and "chat_template =" in r.stderr, r.stderr


def test_no_trained_turn_is_skipped_and_counted_and_show_marks_the_trained_tokens(tmp_path, chat_models):
    model_dir = chat_models["llama3"]
    records = [{"messages": CONVERSATIONS[0]}, {"messages": CONVERSATIONS[0][:2]}, {"messages": CONVERSATIONS[2]}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = _config(tmp_path, model_dir, "[[datasets]]\ndataset_path = 'd.jsonl'\n")
    r = _cli(cfg, "--show", "2")
    assert r.returncode == 0, r.stderr
    assert "skipped 1 without a trained turn" in r.stdout
    # Llama-3 ends a turn with <|eot_id|>, its EOS is <|end_of_text|>: one note
    notes = [line for line in r.stderr.splitlines() if "<|eot_id|>" in line]
    assert len(notes) == 1 and "<|end_of_text|>" in notes[0], r.stderr
    folder = load_manifest(r.stdout.strip().splitlines()[-1])
    assert folder["datasets"][0]["untrained_conversations"] == 1 and folder["datasets"][0]["documents"] == 2
    shown = r.stdout.split("--- train sequence 0")[1]
    assert "--- train sequence 1" in shown and "⟨82 × pad id" in shown
    assert "[+The sea is wide and the wind is strong.<|eot_id|>]" in shown
    assert "│<|begin_of_text|>" in shown  # the second conversation starts a new document
    assert "[+Blue" in shown and "Tell me about the sea." in shown and "[+Tell" not in shown


def test_custom_template_and_renamed_fields(tmp_path, chat_models):
    """chat_template = a file overrides the tokenizer's; `fields` renames the record fields."""
    model_dir = chat_models["chatml"]
    (tmp_path / "t.jinja").write_text(
        "{% for m in messages %}{{ m['role'] | upper + ': ' + m['content'] + eos_token }}{% endfor %}"
    )
    records = [{"talk": [{"who": "user", "said": "Hi"}, {"who": "assistant", "said": "Hello there."}]}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = load_config(
        _config(
            tmp_path,
            model_dir,
            "[[datasets]]\ndataset_path = 'd.jsonl'\nformat = 'messages'\n"
            "fields = { messages = 'talk', role = 'who', content = 'said' }\n",
            "chat_template = 't.jinja'",
        )
    )
    ids, classes, _ = _stream(prepare(cfg, quiet=True))
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    text = "USER: Hi<|im_end|>ASSISTANT: Hello there.<|im_end|>"
    np.testing.assert_array_equal(ids, tok(text, add_special_tokens=False)["input_ids"])
    trained = tok.decode(ids[classes != 0])
    assert trained == "Hello there.<|im_end|>"


def test_raw_text_with_document_attention(tmp_path, tokenizer_dir):
    """Raw text with document_attention = true: no sequence prefix, each document is the tokenizer's own
    encoding (its BOS kept) plus EOS, positions restart at each document and each row, and a document's
    first token has class 0 (mask_tokens still masks raw text)."""
    import shutil

    from tests.assets import sample_text

    shutil.copy(tokenizer_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, tmp_path / name)
    (tmp_path / "config.json").write_text("{}")
    texts = [" ".join(sample_text(n, seed=n)) for n in (3, 1, 5, 2)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    cfg = load_config(
        _config(tmp_path, tmp_path, "[[datasets]]\ndataset_path = 'd.jsonl'\n", "document_attention = true")
    )
    folder = prepare(cfg, quiet=True)
    assert load_manifest(folder)["prefix_ids"] == []
    ids, classes, rows = _stream(folder)
    docs = [tok(t)["input_ids"] + [tok.eos_token_id] for t in texts]
    assert all(d[0] == tok.bos_token_id for d in docs)
    np.testing.assert_array_equal(ids, np.concatenate(docs))
    first = np.cumsum([0] + [len(d) for d in docs])[:-1]
    expected = np.ones(len(ids), dtype=np.int8)
    expected[first] = 0
    np.testing.assert_array_equal(classes, expected)
    positions = np.concatenate([rows.positions([r])[0] for r in range(len(rows))])[: len(ids)]
    t = np.arange(len(ids))
    start = np.repeat(first, [len(d) for d in docs])
    np.testing.assert_array_equal(positions, t - np.maximum(start, t // 96 * 96))
    # without the key, raw text packs as before: BOS prefix per row, BOS stripped, no positions
    cfg = load_config(_config(tmp_path, tmp_path, "[[datasets]]\ndataset_path = 'd.jsonl'\n"))
    folder = prepare(cfg, quiet=True)
    manifest = load_manifest(folder)
    assert manifest["document_attention"] is False and manifest["prefix_ids"] == [tok.bos_token_id]
    assert not open_split(folder, "train").document_attention
