"""The demo and the example configs: every bundled config loads; the demo pipeline steers SmolLM2."""

import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import tomllib

from cap_common.config import load_config
from tests.test_train import stop

ROOT = Path(__file__).resolve().parents[1]
# (config, model_type, layers) of the real model each example is written for
EXAMPLES = [
    ("llama3.1-8b-control.toml", "llama", 32),
    ("llama3.1-70b-qlora-4stages.toml", "llama", 80),
    ("command-r-control.toml", "cohere", 40),
    ("mixtral-8x7b-control.toml", "mixtral", 32),
]


def _fake_model(folder: Path, model_type: str, layers: int) -> Path:
    """Only config.json: all the config loader reads of model_dir."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": model_type, "num_hidden_layers": layers}))
    return folder


@pytest.mark.parametrize("name, model_type, layers", EXAMPLES)
def test_example_configs_validate(tmp_path, name, model_type, layers):
    model = _fake_model(tmp_path / "model", model_type, layers)
    cfg = load_config(ROOT / "examples" / "configs" / name, {"model_dir": str(model)})
    assert cfg.datasets and cfg.model_dir == model.resolve()
    if "70b" in name:
        assert cfg.mode == "qlora" and cfg.pipeline_stages == 4 and cfg.check_world_size(8) == 2
    else:
        assert cfg.mode == "control"


def test_demo_config_validates(tmp_path):
    model = _fake_model(tmp_path / "smol", "llama", 30)
    text = (ROOT / "examples" / "demo" / "config.toml").read_text().replace("@SMOLLM2@", str(model))
    path = ROOT / "examples" / "demo" / f".test-{tmp_path.name}.toml"
    path.write_text(text)
    try:
        cfg = load_config(path)
    finally:
        path.unlink()
    assert cfg.mode == "control" and cfg.control_adapter_target == "writers"
    assert [d.control_class for d in cfg.datasets] == [1, -1]
    pos = (ROOT / "examples" / "demo" / "positive.jsonl").read_text().splitlines()
    neg = (ROOT / "examples" / "demo" / "negative.jsonl").read_text().splitlines()
    assert len(pos) == len(neg) >= 300


# Pirate words as the demo's data writes them (examples/demo/make_data.py); a plain "be" counts only
# where English would say "is"/"are" (not after "to", "will", "can", ...).
PIRATE_WORDS = {"ye", "yer", "matey", "arr", "ahoy", "avast", "hearties", "shiver", "timbers", "scallywag"}
PIRATE_WORDS |= {"landlubber", "landlubbers", "aye", "fer", "o'", "an'", "hearty"}
NOT_PIRATE_BE = {"to", "will", "would", "can", "could", "may", "might", "must", "shall", "should", "not", "won't"}
NOT_PIRATE_BE |= {"cannot", "can't", "don't", "never", "always", "also", "just", "still", "even", "really", "please"}


def pirate_markers(text: str) -> list[str]:
    words = re.findall(r"[a-z']+", text.lower().replace("\u2019", "'"))
    found = [w for w in words if w in PIRATE_WORDS or w.strip("'") in PIRATE_WORDS]
    found += [
        f"{a} be"
        for a, b in zip(words, words[1:])
        if b == "be" and a not in NOT_PIRATE_BE and not a.endswith(("'ll", "'d"))
    ]
    return found


def max_4gram_count(text: str) -> int:
    """How often the most frequent 4-gram of words occurs (1: no repeats)."""
    words = re.findall(r"[\w']+", text.lower())
    return max(Counter(zip(words, words[1:], words[2:], words[3:])).values(), default=0)


def test_pirate_markers_and_repeats():
    assert pirate_markers("Arr, the ship be ready fer the night, matey!") == ["arr", "fer", "matey", "ship be"]
    assert pirate_markers("It'll be sunny; you need to be there. The crew is tired, it will always be.") == []
    assert max_4gram_count("We sailed home. We sailed home. We sailed home.") == 2  # "we sailed home we"
    assert max_4gram_count("the sea the sea") == 1 and max_4gram_count("calm") == 0


@pytest.mark.slow
def test_demo_pipeline_steers_smollm2(tmp_path, smollm2_dir, smollm2_cache):
    """The README's main job, as `make demo` runs it: every stage runs, the training loss and the
    class +1 eval loss fall, verify passes (the demo stops otherwise), the merged model loads and
    generates, and the continuations read as the demo claims: every +1 one has pirate words, no −1 or
    base one has any, and none of them (base included, so the bar is fair) repeats a 4-gram of words
    more than twice."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "examples.demo.run", "--out", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "CAP_CACHE_DIR": str(smollm2_cache)},
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=1500)
    finally:  # a timeout or an interrupt leaves no cap-train behind
        stop(proc)
    out = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    before, after = summary["eval_before"], summary["eval_after"]
    assert after["eval/loss_class+1"] < before["eval/loss_class+1"] - 0.5
    train = [
        json.loads(line)["train/loss"]
        for line in (tmp_path / "train" / "metrics.jsonl").read_text().splitlines()
        if "train/loss" in line
    ]
    steps = tomllib.loads((ROOT / "examples" / "demo" / "config.toml").read_text())["max_steps"]
    assert len(train) == steps and sum(train[-10:]) < sum(train[:10])
    rows = json.loads((tmp_path / "generations.json").read_text())
    assert len(rows) == 4
    shown = json.dumps(rows, indent=1)
    for r in rows:
        assert pirate_markers(r["+1"]), shown
        assert not pirate_markers(r["-1"]) and not pirate_markers(r["base"]), shown
        for k in ("base", "+1", "-1"):
            assert r[k] and max_4gram_count(r[k]) <= 2, (k, r[k])
    assert (tmp_path / "loss_curves.png").stat().st_size > 10_000
    assert "max |Δlogit|" in out.stdout
