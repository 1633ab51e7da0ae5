"""cap-train --plan: per-stage memory from config.json alone, held to reality.

- The weights' bytes of a 70B-shaped model (a config.json only, nothing else on disk) equal a float64
  re-computation from the published shapes, bf16 and 4-bit; --plan answers in seconds, --json for scripts,
  --gpu-memory marks the stages over budget and names the fewest pipeline stages that fit.
- On CPU, the plan's peak for SmolLM2 (1 and 2 stages, activation checkpointing on and off) is within
  ±20% of the peak resident memory cap-train's own metrics report (rank 0 = stage 0)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from cap_common.config import load_config
from cap_train.cli import main as train_main
from cap_train.plan import GIB, make_plan
from tests.test_train import ENV, finish, metrics, start_train, write_config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from plan_table import MODELS  # noqa: E402

H, FF, KV, V = 8192, 28672, 8 * 128, 128256  # Llama-3.1-70B: hidden, intermediate, k/v width, vocabulary


def _70b(tmp_path: Path, **keys) -> Path:
    model = tmp_path / "llama70b"
    model.mkdir(parents=True)
    (model / "config.json").write_text(json.dumps(MODELS["Llama-3.1-70B"]))
    keys = dict(sequence_len=4096, micro_batch_size=1, model_dtype="bfloat16", lora_rank=16) | keys
    return write_config(tmp_path, model, **keys)


def test_plan_of_a_70b_config_in_seconds(tmp_path):
    cfg = _70b(tmp_path, pipeline_stages=8, gradient_accumulation_steps=8, activation_checkpointing=True)
    t0 = time.perf_counter()
    result = CliRunner().invoke(train_main, [str(cfg), "--plan", "--num-gpus", "8", "--gpu-memory", "24", "--json"])
    elapsed = time.perf_counter() - t0
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    assert elapsed < 30 and len(plan["stages"]) == 8
    linear = 2 * H * H + 2 * H * KV + 3 * H * FF  # q, o; k, v; gate, up, down
    per_layer = linear + 2 * H  # + two RMSNorm weights
    # 82 positions over 8 stages, 10 decoder layers each; stage 0 adds the embedding, stage 7 the head
    first, middle = plan["stages"][0], plan["stages"][3]
    assert middle["base"] == 10 * per_layer * 2
    assert first["base"] == 10 * per_layer * 2 + V * H * 2
    lora = 16 * sum(i + o for i, o in [(H, H), (H, KV), (H, KV), (H, H), (H, FF), (H, FF), (FF, H)])  # r·(in+out)
    assert middle["trainable"] == 10 * lora * 4  # float32 adapters
    assert middle["optimizer"] == 2 * middle["trainable"]
    assert plan["tokens_per_step"] == 4096 * 8 and plan["bubble"] == pytest.approx(7 / 15)
    assert plan["fits"] is False and plan["smallest_fit"] == {"pipeline_stages": 3, "load_in_4bit": True}

    quant = make_plan(load_config(str(_70b(tmp_path / "q", pipeline_stages=8, load_in_4bit=True))), 8, "cuda")
    assert quant.stages[3].base == pytest.approx(10 * (linear * (0.5 + 1 / 64 + 4 / (64 * 256)) + 2 * H * 2))

    text = CliRunner().invoke(train_main, [str(cfg), "--plan", "--num-gpus", "8", "--gpu-memory", "24"]).output
    over = sum(peak > 24 * GIB for peak in plan["peak_bytes"])
    assert 0 < over < 8 and text.count("> --gpu-memory") == over
    assert "smallest that fits in 24 GiB per GPU: pipeline_stages = 3, load_in_4bit = true" in text


@pytest.fixture(scope="module")
def smollm2_runs(tmp_path_factory, smollm2_dir):
    """SmolLM2 trained for one step on 1 and 2 stages, checkpointing on and off, two runs at a time
    over one prepared dataset: {(stages, checkpointing): config path}."""
    model = smollm2_dir
    root = tmp_path_factory.mktemp("plan")
    runs = {}
    for stages in (1, 2):
        for ckpt in (False, True):
            cfg = write_config(
                root / f"s{stages}c{int(ckpt)}",
                model,
                sequence_len=512,
                micro_batch_size=2,
                gradient_accumulation_steps=stages,  # 1 stage holds one micro batch in flight whatever the count
                max_steps=1,
                evals_per_run=0,
                eval_fraction=0.05,
                pipeline_stages=stages,
                activation_checkpointing=ckpt,
                use_control_adapters=True,
                lora_rank=8,
                prepared_dir=str(root / "prepared"),
            )
            runs[stages, ckpt] = cfg
    subprocess.run(
        [sys.executable, "-m", "cap_prep.cli", str(runs[1, False])], env=ENV, check=True, capture_output=True
    )
    pairs = list(runs.items())
    for i in range(0, len(pairs), 2):
        finish(*(start_train(cfg, stages) for (stages, _), cfg in pairs[i : i + 2]))
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("stages, ckpt", [(1, False), (1, True), (2, False), (2, True)])
def test_plan_is_within_20_percent_of_the_measured_peak(smollm2_runs, stages, ckpt):
    cfg = smollm2_runs[stages, ckpt]
    record = metrics(cfg.parent / "out")
    measured = max(r["memory/peak_rss_gib"] for r in record.values() if "memory/peak_rss_gib" in r)
    planned = make_plan(load_config(str(cfg)), stages).stages[0].peak(ckpt) / GIB
    assert planned == pytest.approx(measured, rel=0.2), (planned, measured)


def test_plan_counts_moe_experts_shared_experts_and_latent_attention(tmp_path):
    """DeepSeek-V3's layers (tiny config: a dense first layer, then routed + shared experts and multi-head
    latent attention): stage 0's weights equal a count from the config's published shapes."""
    from tests import assets

    model = tmp_path / "deepseek"
    assets.tiny_config("deepseek_v3", assets.tiny_tokenizer()).save_pretrained(model)
    c = json.loads((model / "config.json").read_text())
    H, heads, V = c["hidden_size"], c["num_attention_heads"], c["vocab_size"]
    q, kv, rope, nope, v = (
        c["q_lora_rank"],
        c["kv_lora_rank"],
        c["qk_rope_head_dim"],
        c["qk_nope_head_dim"],
        c["v_head_dim"],
    )
    attention = H * q + q + q * heads * (nope + rope) + H * (kv + rope) + kv + kv * heads * (nope + v) + heads * v * H
    E, moe = c["n_routed_experts"], c["moe_intermediate_size"]
    dense_layer = attention + 2 * H + 3 * H * c["intermediate_size"]
    moe_layer = attention + 2 * H + E * H + E * 3 * moe * H + 3 * H * moe * c["n_shared_experts"]
    cfg = write_config(tmp_path, model, model_dtype="float32", pipeline_stages=2, use_control_adapters=True)
    plan = make_plan(load_config(str(cfg)), 2, "cuda")
    assert plan.stages[0].positions == (0, 2)  # the embedding, the dense layer 0 and the MoE layer 1
    assert plan.stages[0].base == 4 * (V * H + dense_layer + moe_layer)
