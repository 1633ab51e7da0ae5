"""Every kind of training through the real cap-train, as users run it: each control adapter type ×
target, LoRA, QLoRA and full fine-tune, on 1 process and on 2 processes × 2 pipeline stages.

Each run's written output (epoch<N>/) is loaded by an independent reference — transformers'
model with the adapter applied by forward hooks from the saved tensors (control adapters), PEFT
(LoRA), PEFT on bitsandbytes-dequantized base weights (QLoRA), from_pretrained (full) — which
must reproduce the eval loss (overall and per class) that cap-train reported at its last step;
and the two topologies must train the same model (same per-step losses).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow as pa
import pytest
import torch
import transformers
from safetensors.torch import load_file

from tests.test_export_support import dense_w
from tests.test_train import metrics, start_train, write_config

pytestmark = pytest.mark.slow

CONTROL = [
    ("control", t, target, None)
    for t in ("full", "symmetrise", "antisymmetrise", "spectral")
    for target in ("block", "writers")
]
# (mode, control adapter type, target, layers_to_transform); the last two train a layer subset that
# leaves one of the two pipeline stages without any trainable parameter (stage 0 holds layers 0-1)
CASES = CONTROL + [
    ("lora", None, None, "1:3"),
    ("qlora", None, None, None),
    ("full", None, None, None),
    ("lora", None, None, "0:0"),
    ("control", "full", "block", "3:3"),
]
TOPOLOGIES = ((1, 1), (2, 2))
# The 2-stage runs take turns through the activation_checkpointing modes (common/models/recompute.py),
# and every third 1-process run compiles its layers, so that each mode trains some kind of adapter
# through the real cap-train and still reproduces the references.
CHECKPOINTING = (True, "selective", "offload", 2)
STEPS = 2
WRITERS = ("self_attn.o_proj", "mlp.down_proj")  # the tiny Llama's residual writers


def case_keys(mode: str, adapter_type: str | None, target: str | None, layers: str | None) -> dict:
    keys = {"layers_to_transform": layers} if layers else {}
    if mode == "control":
        return dict(
            use_control_adapters=True,
            control_adapter_type=adapter_type,
            control_adapter_target=target,
            lr=2e-2,
            lora_alpha=8,
            **keys,
        )
    return {
        "lora": dict(lr=2e-2),
        "qlora": dict(load_in_4bit=True, model_dtype="bfloat16", lr=2e-2),
        "full": dict(full_fine_tune=True, lr=1e-3),
    }[mode] | keys


# ---------------------------------------------------------------- the reference
def eval_rows(prepared: Path, per_batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The eval rows cap-train evaluates (whole eval batches of the one data-parallel replica),
    read from the Arrow shards with pyarrow: (input_ids [n,L], control_class [n,L])."""
    folders = [p for p in prepared.iterdir() if (p / "manifest.json").is_file()]
    assert len(folders) == 1
    manifest = json.loads((folders[0] / "manifest.json").read_text())
    ids, classes = [], []
    for shard in manifest["splits"]["eval"]["shards"]:
        table = pa.ipc.open_file(pa.memory_map(str(folders[0] / shard["file"]))).read_all()
        L = manifest["sequence_len"]
        ids.append(torch.tensor(table.column("input_ids").combine_chunks().flatten().to_numpy()).view(-1, L))
        classes.append(torch.tensor(table.column("control_class").combine_chunks().flatten().to_numpy()).view(-1, L))
    ids, classes = torch.cat(ids), torch.cat(classes)
    n = len(ids) // per_batch * per_batch
    return ids[:n].long(), classes[:n].long()


def control_hooks(model, folder: Path, state_classes: list[torch.Tensor]):
    """Forward hooks applying the saved control adapter with each position's own class
    (D₊ for +1, D₋ for −1, nothing for 0), on the block delta or on every writer's output."""
    config = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    kind, target = config["control_adapter_type"], config["control_adapter_target"]
    scale = config["lora_alpha"] / config["r"]
    hooks = []
    for i, block in enumerate(model.model.layers):
        prefix = f"base_model.model.model.layers.{i}."
        if not any(name.startswith(prefix) for name in tensors):  # not in layers_to_transform
            continue
        if kind == "spectral":
            state = {"Q": tensors[prefix + "control_Q"], "S": tensors[prefix + "control_S"]}
            d_pos = dense_w(state, kind, scale, "forward").float()
            d_neg = dense_w(state, kind, scale, "inverse").float()  # Q·diag(e^−S − 1)·Qᵀ
        else:
            state = {"A": tensors[prefix + "control_A.weight"], "B": tensors[prefix + "control_B.weight"]}
            d_pos = dense_w(state, kind, scale, "forward").float()
            d_neg = -d_pos  # class −1 trains I − W'

        def transform(x, d_pos=d_pos, d_neg=d_neg):
            c = state_classes[0].reshape(x.shape[:-1]).unsqueeze(-1).to(x.dtype)
            return x + (c > 0) * (x @ d_pos.T) + (c < 0) * (x @ d_neg.T)

        if target == "writers":
            for path in WRITERS:
                hooks.append(block.get_submodule(path).register_forward_hook(lambda m, a, out, f=transform: f(out)))
        else:

            def block_hook(m, args, kwargs, out, f=transform):
                h = args[0] if args else kwargs["hidden_states"]
                y = out[0] if isinstance(out, tuple) else out
                y = h + f(y - h)
                return (y, *out[1:]) if isinstance(out, tuple) else y

            hooks.append(block.register_forward_hook(block_hook, with_kwargs=True))
    return hooks


def dequantized_base(model_dir: Path, tmp: Path) -> Path:
    """The base with every decoder-layer linear weight replaced by its nf4 (double-quant, block 64)
    round trip, as bitsandbytes quantizes it for QLoRA; bf16, like the trained model computes."""
    import bitsandbytes.functional as F

    if tmp.exists():
        return tmp
    tensors = load_file(str(model_dir / "model.safetensors"))
    for name, w in tensors.items():
        if ".layers." in name and name.endswith("proj.weight"):
            q, state = F.quantize_4bit(w.to(torch.bfloat16), blocksize=64, compress_statistics=True, quant_type="nf4")
            tensors[name] = F.dequantize_4bit(q, state).to(torch.bfloat16)
        else:
            tensors[name] = w.to(torch.bfloat16)
    import shutil

    from safetensors.torch import save_file

    shutil.copytree(model_dir, tmp, ignore=shutil.ignore_patterns("*.safetensors"))
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    return tmp


@torch.no_grad()
def reference_eval_loss(
    mode: str, model_dir: Path, folder: Path, ids: torch.Tensor, control: torch.Tensor, tmp: Path
) -> dict[str, float]:
    """Token-mean cross entropy of the saved model over the eval rows: overall and per class.
    Position t predicts token t+1 and carries its class; class-0 labels carry no loss."""
    dtype = torch.bfloat16 if mode == "qlora" else torch.float32
    if mode == "full":
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    else:
        base_dir = dequantized_base(model_dir, tmp / "dequantized") if mode == "qlora" else model_dir
        model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
        if mode in ("lora", "qlora"):
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, folder)
    model.eval()
    label_class = torch.zeros_like(control)
    label_class[:, :-1] = control[:, 1:]
    current = [label_class]
    hooks = control_hooks(model, folder, current) if mode == "control" else []
    sums = {"all": 0.0, "class+1": 0.0, "class-1": 0.0}
    counts = dict.fromkeys(sums, 0)
    try:
        for i in range(len(ids)):
            current[0] = label_class[i : i + 1]
            logits = model(input_ids=ids[i : i + 1]).logits[0, :-1].double()
            nll = torch.nn.functional.cross_entropy(logits, ids[i, 1:], reduction="none")
            c = label_class[i, :-1]
            for name, mask in (("all", c != 0), ("class+1", c == 1), ("class-1", c == -1)):
                sums[name] += float(nll[mask].sum())
                counts[name] += int(mask.sum())
    finally:
        for hook in hooks:
            hook.remove()
    return {f"eval/loss_{k}": sums[k] / counts[k] for k in sums if counts[k]}


# ---------------------------------------------------------------- the matrix
def case_id(case) -> str:
    mode, adapter_type, target, layers = case
    name = f"{mode}-{adapter_type}-{target}" if adapter_type else mode
    return f"{name}-layers{layers.replace(':', '-')}" if layers else name


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    """Every case on both topologies, run three processes at a time (start-up is mostly serial
    Python, so two cores stay busy): {(case id, procs): (finished process, stderr, output_dir,
    prepared_dir)}. One data folder; one prepared dataset for the control cases, one for the others."""
    root = tmp_path_factory.mktemp("matrix")
    model = tiny_model_dir("llama")
    jobs = []
    for i, case in enumerate(CASES):
        prepared = root / ("prepared-control" if case[0] == "control" else "prepared-plain")
        for procs, stages in TOPOLOGIES:
            out = root / case_id(case) / f"p{procs}"
            cfg = write_config(
                root,
                model,
                max_steps=STEPS,
                evals_per_run=2,
                eval_fraction=0.15,
                prepared_dir=str(prepared),
                output_dir=str(out),
                pipeline_stages=stages,
                activation_checkpointing=CHECKPOINTING[i % len(CHECKPOINTING)] if stages == 2 else False,
                compile_layers=stages == 1 and i % 3 == 0,
                **case_keys(*case),
            )
            cfg = cfg.rename(root / f"cfg-{case_id(case)}-{procs}.toml")
            jobs.append(((case_id(case), procs), cfg, out, prepared))
    jobs.sort(key=lambda job: -job[0][1])  # the 2-process runs first, the 1-process ones fill in
    pending, running, results = list(jobs), [], {}
    while pending or running:
        busy = sum(job[0][1] for job, _ in running)
        ready = next((job for job in pending if busy + job[0][1] <= 3), None)
        if ready is not None:
            pending.remove(ready)
            running.append((ready, start_train(ready[1], ready[0][1])))
            continue
        for job, proc in list(running):
            if proc.poll() is not None:
                running.remove((job, proc))
                results[job[0]] = (proc, proc.err_path.read_text(), job[2], job[3])
        time.sleep(0.05)
    return results


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_every_kind_trains_and_its_output_reproduces_the_eval_loss(trained, tiny_model_dir, tmp_path, case):
    torch.set_num_threads(1)
    mode = case[0]
    model = tiny_model_dir("llama")
    losses = {}
    for procs, _ in TOPOLOGIES:
        proc, err, out, prepared = trained[case_id(case), procs]
        assert proc.returncode == 0, err[-3000:]
        record = metrics(out)
        assert sorted(record) == list(range(STEPS + 1))
        losses[procs] = [record[s]["train/loss"] for s in range(1, STEPS + 1)]
        got = {k: v for k, v in record[STEPS].items() if k.startswith("eval/")}
        if mode != "full":  # the written adapter covers exactly the layers the config selects
            first, last = map(int, (case[3] or "0:3").split(":"))
            written = load_file(str(out / "epoch1" / "adapter_model.safetensors"))
            assert {int(k.split(".layers.")[1].split(".")[0]) for k in written} == set(range(first, last + 1))
        ids, control = eval_rows(prepared, per_batch=2 * 2)  # micro_batch_size × gradient_accumulation_steps
        want = reference_eval_loss(mode, model, out / "epoch1", ids, control, tmp_path)
        assert set(got) == set(want) and want["eval/loss_all"] > 0
        rel = 2e-2 if mode == "qlora" else 1e-4  # QLoRA: both sides compute in bf16, in other orders
        for name in want:
            assert got[name] == pytest.approx(want[name], rel=rel), (procs, name)
        if mode != "full":  # the adapter moved the model away from the base
            assert record[STEPS]["eval/loss_all"] != pytest.approx(record[0]["eval/loss_all"], rel=1e-6)
    assert losses[1] == pytest.approx(losses[2], rel=2e-2 if mode == "qlora" else 1e-4)


@pytest.mark.parametrize("case_name", ["qlora", "lora-layers0-0"])
def test_checkpoints_hold_the_trainable_tensors_only(trained, case_name):
    """The last checkpoint holds exactly the adapter tensors written to epoch1/ (the trainable
    parameters) and their Adam moments: no 4-bit quantization state of the frozen base, nothing for a
    stage without adapters. Read with safetensors alone."""
    from safetensors import safe_open

    for procs, _ in TOPOLOGIES:
        proc, err, out, _ = trained[case_name, procs]
        assert proc.returncode == 0, err[-3000:]
        checkpoint = max((out / "checkpoints").glob("step*"))
        saved, moments = set(), set()
        for path in sorted(checkpoint.glob("trainable-stage*.safetensors")):
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    name, _, state = key.partition("#")
                    position, _, rest = name.partition(".layer.")  # pipeline position = layer index + 1
                    peft = f"base_model.model.model.layers.{int(position) - 1}.{rest}"
                    (moments.add((peft, state)) if state else saved.add(peft))
        written = set(load_file(str(out / "epoch1" / "adapter_model.safetensors")))
        assert saved == written and written, (procs, sorted(saved ^ written)[:5])
        assert moments == {(n, s) for n in written for s in ("exp_avg", "exp_avg_sq")}


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_the_plan_holds_for_the_tiny_models(trained, case):
    """cap-train --plan's per-process peak (stage 0, on CPU) within ±20% of the peak resident memory
    rank 0 reported, on both topologies (tests/test_plan.py holds it for SmolLM2)."""
    from cap_common.config import load_config
    from cap_train.plan import GIB, make_plan

    for procs, _ in TOPOLOGIES:
        proc, err, out, _ = trained[case_id(case), procs]
        assert proc.returncode == 0, err[-3000:]
        measured = max(r["memory/peak_rss_gib"] for r in metrics(out).values() if "memory/peak_rss_gib" in r)
        cfg = load_config(str(out.parent.parent / f"cfg-{case_id(case)}-{procs}.toml"))
        planned = make_plan(cfg, procs).peaks()[0] / GIB
        assert planned == pytest.approx(measured, rel=0.2), (procs, planned, measured)
