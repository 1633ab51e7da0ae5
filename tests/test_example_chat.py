"""examples/chat end to end: cap-prep renders SmolLM2's chat template and trains only the assistant's
replies; cap-train lowers the eval loss of the +1 (cheerful) replies under class +1 and of the −1 (terse)
replies under class −1; both LoRAs export, and their replies have the two styles."""

import json
import os
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


TERSE = ("Briefly:", "In short:", "Answer:", "Fact:")  # examples/chat/make_data.py's lead words


@pytest.mark.slow
def test_chat_example_trains_the_replies(tmp_path, smollm2_dir, smollm2_cache):
    """`make chat` as it runs: the eval losses of both styles fall under their classes, and the replies to
    questions it never saw read as the example says: every −1 reply is a plain statement that starts with a
    lead word of the terse data and is shorter than the base model's; every +1 reply exclaims and starts
    with none; the base model's replies use none of them."""
    out = tmp_path / "chat"
    r = subprocess.run(
        [sys.executable, "-m", "examples.chat.run", "--out", str(out)],
        cwd=ROOT,
        env={**os.environ, "CAP_CACHE_DIR": str(smollm2_cache)},
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "[+Oh, what a great question!" in r.stdout or "[+Ooh" in r.stdout or "[+Happy" in r.stdout
    summary = json.loads((out / "summary.json").read_text())
    before, after = summary["eval_before"], summary["eval_after"]
    # measured (40 steps at 4e-3, AVX2 CPU): +1 3.13 → 1.54, −1 3.23 → 1.90
    assert after["eval/loss_class+1"] < before["eval/loss_class+1"] - 1.0, summary
    assert after["eval/loss_class-1"] < before["eval/loss_class-1"] - 0.5, summary
    replies = json.loads((out / "replies.json").read_text())
    shown = json.dumps(replies, indent=1)
    assert len(replies) == 3, shown
    for reply in replies:
        assert reply["-1"].startswith(TERSE) and len(reply["-1"]) < len(reply["base"]), shown
        assert "!" not in reply["-1"], shown
        assert "!" in reply["+1"] and not reply["+1"].startswith(TERSE), shown
        assert not any(word in reply["base"] for word in TERSE), shown

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
