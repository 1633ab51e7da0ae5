"""examples/chat end to end in small form: cap-prep renders SmolLM2's chat template and trains only the
assistant's replies; a few steps of cap-train lower the eval loss of the +1 (cheerful) replies under class
+1 and of the −1 (terse) replies under class −1; both LoRAs export and generate."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import transformers

from cap_prep.shards import open_split

ROOT = Path(__file__).resolve().parents[1]


def _turns(ids, tok):
    """Per token of one packed row: (role of its turn, whether it trains if that role trains). A turn is
    <|im_start|>role\n (header, never trained) content <|im_end|> (trained) and what follows up to the next
    <|im_start|> (not trained); role None before the row's first <|im_start|>."""
    start, end = tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("<|im_end|>")
    newline = tok("\n", add_special_tokens=False)["input_ids"][0]
    role, state, name, out = None, "outside", [], []
    for i in ids:
        if i == start:
            state, name = "header", []
        elif state == "header" and i == newline:
            role = tok.decode(name).strip()
            out.append((role, False))
            state = "content"
            continue
        elif state == "header":
            name.append(i)
        out.append((role if state != "header" else None, state == "content"))
        if i == end:
            state = "outside"
    return out


@pytest.mark.slow
def test_chat_example_trains_the_replies(tmp_path, smollm2_dir):
    out = tmp_path / "chat"
    r = subprocess.run(
        [sys.executable, "-m", "examples.chat.run", "--out", str(out), "--steps", "8"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "[+Oh, what a great question!" in r.stdout or "[+Ooh" in r.stdout or "[+Happy" in r.stdout
    summary = json.loads((out / "summary.json").read_text())
    before, after = summary["eval_before"], summary["eval_after"]
    # measured (8 steps): +1 3.13 → 2.74, −1 3.29 → 3.24 (class −1 trains through the inverse and moves later)
    assert after["eval/loss_class+1"] < before["eval/loss_class+1"] - 0.2, summary
    assert after["eval/loss_class-1"] < before["eval/loss_class-1"] - 0.01, summary
    replies = json.loads((out / "replies.json").read_text())
    assert len(replies) == 3 and all(r["base"] and r["+1"] and r["-1"] for r in replies)

    # system and user tokens (and every turn's header) carry class 0; the assistant's content and <|im_end|> train
    tok = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    folder = next((out / "train" / "prepared").glob("[0-9a-f]*"))
    for split in ("train", "eval"):
        rows = open_split(folder, split)
        for r in range(len(rows)):
            ids, classes = rows[r]
            for (role, trains), c in zip(_turns(ids.tolist(), tok), classes.tolist()):
                if role is None:
                    continue  # a header, or a turn continued from the previous row (its role is not in this one)
                assert (c != 0) == (role == "assistant" and trains), (split, r, role, c)
        assert (rows.control_class[0] != 0).any()
    assert np.isin(np.concatenate(open_split(folder, "train").control_class).ravel(), [-1, 0, 1]).all()
