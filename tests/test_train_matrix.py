"""Every kind of training through the real cap-train, as users run it: each control adapter type ×
target, LoRA, QLoRA and full fine-tune, on 1 process and on 2 processes × 2 pipeline stages, with
evals between the steps and every regularizer somewhere.

Two independent references hold each run:
- training: tests/reference_trainer.py trains the same config from cap's initial adapter with
  transformers, PEFT (on the nf4-dequantized base for QLoRA), forward hooks (control adapters) and
  torch-optimi's Adam; every step's loss and gradient norm and the trained tensors must agree;
- output: the written epoch<N>/, loaded by transformers (hooks from the saved tensors, PEFT on the
  dequantized base, from_pretrained), must reproduce the eval loss cap-train reported at its last
  step, overall and per class.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from cap_common.dtypes import cpu_has_native_bf16
from tests import reference_trainer as reference
from tests.test_train import metrics, run_train, start_train, write_config

pytestmark = pytest.mark.slow

CONTROL = [
    ("control", t, target, None)
    for t in ("full", "symmetrise", "antisymmetrise", "spectral")
    for target in ("block", "writers")
]
# Decoupled regularization per case (lora_weight_decay, its type, lora_max_norm): each kind trains
# somewhere, and the max norms are small enough to bind within three steps.
REGULARIZE = {
    "control-full-block": (1.0, "nuclear", 0.0),
    "control-full-writers": (1.0, "l2", 0.0),
    "control-symmetrise-block": (1.0, "l1", 0.05),
    "control-antisymmetrise-writers": (0.0, "nuclear", 0.05),
    "control-spectral-block": (0.5, "nuclear", 0.0),
    "control-spectral-writers": (1.0, "l2", 0.005),
    "lora-layers1-3": (1.0, "l2", 0.0),
    "lora-layers0-0": (1.0, "l1", 0.0),
    "control-full-block-layers3-3": (1.0, "nuclear", 0.05),
}
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
# Families whose layers differ from Llama's in what training passes through, trained by control adapters:
# on the writers of Qwen3-MoE (routed experts, a dense layer among MoE ones, sliding window, QK-norm) and
# DeepSeek-V3 (multi-head latent attention, shared + routed experts with a grouped sigmoid router, a dense
# first layer); on the blocks of GPT-OSS (attention sinks, biased experts, alternating sliding layers).
# tests/assets.py has their tiny configs.
FAMILY_CASES = [
    ("qwen3_moe", ("control", "full", "writers", None)),
    ("deepseek_v3", ("control", "spectral", "writers", None)),
    ("gpt_oss", ("control", "full", "block", None)),
]
# The 2-stage runs take turns through the activation_checkpointing modes (common/models/recompute.py),
# and every third 1-process run compiles its layers, so that each mode trains some kind of adapter
# through the real cap-train and still reproduces the references.
CHECKPOINTING = (True, "selective", "offload", 2)
STEPS = 3
EVALS = 3  # at steps 0, 2 and 3: an eval between two training steps
# 4-bit runs made with and without evals (1 process): an eval between steps must change nothing.
# q_proj and v_proj reach the loss only through the frozen 4-bit o_proj: they train only when
# gradients pass through 4-bit weights. They run on the path of a CPU without native bf16 whatever
# this CPU is (oneDNN and ATen limited to AVX2, cap's predicate forced off), while the matrix's qlora
# case runs on this CPU's own path: both paths are held to the reference on every machine.
FOUR_BIT = {
    "qlora-qv": dict(load_in_4bit=True, model_dtype="bfloat16", lr=2e-2, target_modules=["q_proj", "v_proj"]),
    "control-4bit-writers": dict(
        load_in_4bit=True,
        model_dtype="bfloat16",
        lr=2e-2,
        use_control_adapters=True,
        control_adapter_type="full",
        control_adapter_target="writers",
        lora_alpha=8,
    ),
}
NON_NATIVE_BF16 = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "CAP_NATIVE_BF16": "0"}


def case_keys(mode: str, adapter_type: str | None, target: str | None, layers: str | None) -> dict:
    keys = {"layers_to_transform": layers} if layers else {}
    decay, kind, max_norm = REGULARIZE.get(case_id((mode, adapter_type, target, layers)), (0.0, "nuclear", 0.0))
    keys |= dict(lora_weight_decay=decay, lora_weight_decay_type=kind, lora_max_norm=max_norm)
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
    """The eval rows cap-train evaluates (whole eval batches of the one data-parallel replica)."""
    ids, classes = reference.split_rows(prepared, "eval")
    n = len(ids) // per_batch * per_batch
    return ids[:n], classes[:n]


def saved_control_hooks(model, folder: Path, label_class: list):
    """The reference's control adapter hooks with the tensors saved in `folder` (epoch<N>/)."""
    config = json.loads((folder / "adapter_config.json").read_text())
    keys = {k: config[k] for k in ("control_adapter_type", "control_adapter_target", "lora_alpha")}
    run = reference.Run("control", folder, keys | {"lora_rank": config["r"]})
    params: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in load_file(str(folder / "adapter_model.safetensors")).items():
        layer = int(name.split(".layers.")[1].split(".")[0])
        params.setdefault(layer, {})[name.rsplit("control_", 1)[1].split(".")[0]] = tensor.float()
    return reference.add_control_hooks(model, run, params, label_class)


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
        base_dir = reference.dequantized_base(model_dir, tmp / "dequantized") if mode == "qlora" else model_dir
        model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
        if mode in ("lora", "qlora"):
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, folder)
    model.eval()
    label_class = torch.zeros_like(control)
    label_class[:, :-1] = control[:, 1:]
    current = [label_class]
    hooks = saved_control_hooks(model, folder, current) if mode == "control" else []
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
    """Every case on both topologies, and the 4-bit runs with and without evals, run three processes
    at a time (start-up is mostly serial Python, so two cores stay busy): {(run id, procs): (finished
    process, stderr, output_dir, prepared_dir)}. The config of each is root/cfg-<run id>-<procs>.toml.
    One data folder; one prepared dataset for the control runs, one for the others."""
    root = tmp_path_factory.mktemp("matrix")
    jobs = []

    def add(name: str, procs: int, env: dict | None = None, family: str = "llama", **keys):
        prepared = root / ("prepared-control" if keys.get("use_control_adapters") else "prepared-plain")
        prepared = prepared.with_name(f"{prepared.name}-{family}") if family != "llama" else prepared
        out = root / name / f"p{procs}"
        keys = dict(max_steps=STEPS, evals_per_run=EVALS, warmup="rms_ratio", eval_fraction=0.15) | keys
        cfg = write_config(root, tiny_model_dir(family), prepared_dir=str(prepared), output_dir=str(out), **keys)
        jobs.append(((name, procs), cfg.rename(root / f"cfg-{name}-{procs}.toml"), out, prepared, env))

    for i, case in enumerate(CASES):
        for procs, stages in TOPOLOGIES:
            add(
                case_id(case),
                procs,
                pipeline_stages=stages,
                activation_checkpointing=CHECKPOINTING[i % len(CHECKPOINTING)] if stages == 2 else False,
                compile_layers=stages == 1 and i % 3 == 0,
                max_grad_norm=0.01 if i % 2 else 1.0,  # clipping binds in every other case
                **case_keys(*case),
            )
    for i, (family, case) in enumerate(FAMILY_CASES):
        for procs, stages in TOPOLOGIES:
            checkpointing = CHECKPOINTING[i % len(CHECKPOINTING)] if stages == 2 else False
            keys = case_keys(*case) | dict(activation_checkpointing=checkpointing, max_grad_norm=1.0)
            add(f"{family}-{case_id(case)}", procs, family=family, pipeline_stages=stages, **keys)
    for name, keys in FOUR_BIT.items():
        for evals in (EVALS, 0):
            add(f"{name}-evals{evals}", 1, NON_NATIVE_BF16, evals_per_run=evals, activation_checkpointing=False, **keys)
    jobs.sort(key=lambda job: -job[0][1])  # the 2-process runs first, the 1-process ones fill in
    pending, running, results = list(jobs), [], {}
    while pending or running:
        busy = sum(job[0][1] for job, _ in running)
        ready = next((job for job in pending if busy + job[0][1] <= 3), None)
        if ready is not None:
            pending.remove(ready)
            running.append((ready, start_train(ready[1], ready[0][1], env=ready[4])))
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


# ---------------------------------------------------------------- training against the reference trainer
# (loss and ‖g‖ per step, each tensor against its norm, each tensor against how far it moved).
# fp32 runs agree to float32 rounding: measured ≤ 2e-7, ≤ 3e-6 and ≤ 9e-6 (Adam's first steps divide
# by |g|, which amplifies the rounding of the elements whose gradient is near zero). The 4-bit runs
# compute in bf16 on both sides, in other orders where cap fuses (its loss kernels, CUDA kernels):
# the loss and ‖g‖ to bf16's resolution, the update to a few percent.
# The reference computes the LM head as cap documents for the CPU the run used: through an fp32 copy of
# the bf16 weight without native bf16, in bf16 with it. Both trainers are deterministic, so these
# bounds hold on every CPU; test_the_4bit_comparisons_catch_injected_bugs shows that they still catch
# bugs that move a 4-bit run by a few percent.
NATIVE_BF16 = cpu_has_native_bf16()
TOLERANCE = {"fp32": (1e-5, 1e-5, 5e-5), "bf16": (1e-2, 1e-2, 5e-2)}


def written_tensors(folder: Path, mode: str) -> dict[str, torch.Tensor]:
    """The trained tensors of epoch<N>/: the adapter, or every weight of a full fine-tune's model."""
    files = sorted(folder.glob("*.safetensors")) if mode == "full" else [folder / "adapter_model.safetensors"]
    return {k: v for f in files for k, v in load_file(str(f)).items()}


def reference_training(cfg: Path, prepared: Path, tmp: Path, native_bf16: bool = NATIVE_BF16, bugs=reference.Bugs()):
    """(initial tensors, tensors after STEPS steps, [loss], [‖g‖]) of the reference trainer, with the
    LM head as cap computes it on a CPU with or without `native_bf16`."""
    run = reference.Run.from_toml(cfg)
    if run.mode == "full":
        initial = {k: v.detach().clone() for k, v in reference.base_model(run, tmp).named_parameters()}
    else:
        initial = reference.cap_initial_adapter(cfg)
    after, losses, norms = reference.train(run, prepared, initial, STEPS, tmp, not native_bf16, bugs)
    return {k: reference.orthonormal_q(k, v) for k, v in initial.items()}, after, losses, norms


def assert_trains_like(record: dict, written: dict, ref, tolerance: tuple[float, float, float], where) -> None:
    """Each step's loss and ‖g‖ within rel tolerance[0]; each tensor x within tolerance[1] of the
    reference's x_ref (‖x − x_ref‖_F ≤ rel·‖x_ref‖_F) and within tolerance[2] of how far the reference
    moved it (‖x − x_ref‖_F ≤ rel·‖x_ref − x₀‖_F)."""
    initial, after, losses, norms = ref
    step_rel, tensor_rel, update_rel = tolerance
    for step in range(1, STEPS + 1):
        got = record[step]
        assert got["train/loss"] == pytest.approx(losses[step - 1], rel=step_rel), (where, step)
        assert got["train/grad_norm"] == pytest.approx(norms[step - 1], rel=step_rel), (where, step)
    assert set(written) == set(after), (where, sorted(set(written) ^ set(after))[:4])
    for name, want in after.items():
        off = float((written[name].double() - want.double()).norm())
        assert off <= tensor_rel * float(want.double().norm()), (where, name, off)
        assert off <= update_rel * float((want.double() - initial[name].double()).norm()), (where, name, off)


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_training_equals_an_independent_trainer(trained, tmp_path, case):
    """Three steps with an eval between them, on 1 process and on 2 × 2 stages, from the same initial
    adapter: every step's loss and gradient norm, and the trained tensors, equal the reference's."""
    torch.set_num_threads(1)
    name, four_bit = case_id(case), case[0] == "qlora"
    _, _, out, prepared = trained[name, 1]
    ref = reference_training(out.parent.parent / f"cfg-{name}-1.toml", prepared, tmp_path)
    for procs, _ in TOPOLOGIES:
        proc, err, out, _ = trained[name, procs]
        assert proc.returncode == 0, err[-3000:]
        written = written_tensors(out / "epoch1", case[0])
        assert_trains_like(metrics(out), written, ref, TOLERANCE["bf16" if four_bit else "fp32"], procs)


@pytest.mark.parametrize("family, case", FAMILY_CASES, ids=[f for f, _ in FAMILY_CASES])
def test_moe_latent_attention_and_sinks_families_train_like_the_reference(
    trained, tiny_model_dir, tmp_path, family, case
):
    """A family's run on 1 process and on 2 × 2 stages (evals between the steps) trains what the reference
    trainer trains (transformers' own layers, the adapter hooked on every writer the layer has: the
    routed experts' sum, the shared experts', a dense layer's MLP), and its written adapter on transformers
    reproduces the eval loss cap-train reported, overall and per class."""
    torch.set_num_threads(1)
    name = f"{family}-{case_id(case)}"
    _, _, out, prepared = trained[name, 1]
    ref = reference_training(out.parent.parent / f"cfg-{name}-1.toml", prepared, tmp_path)
    for procs, _ in TOPOLOGIES:
        proc, err, out, prepared = trained[name, procs]
        assert proc.returncode == 0, err[-3000:]
        record = metrics(out)
        assert_trains_like(record, written_tensors(out / "epoch1", case[0]), ref, TOLERANCE["fp32"], procs)
        ids, control = eval_rows(prepared, per_batch=2 * 2)
        want = reference_eval_loss(case[0], tiny_model_dir(family), out / "epoch1", ids, control, tmp_path)
        got = {k: v for k, v in record[STEPS].items() if k.startswith("eval/")}
        assert set(got) == set(want)
        for key in want:
            assert got[key] == pytest.approx(want[key], rel=1e-4), (procs, key)


@pytest.mark.parametrize("name", FOUR_BIT)
def test_an_eval_between_4bit_steps_changes_nothing(trained, tmp_path, name):
    """A 4-bit run with evals between its steps trains bit for bit what it trains without them, every
    adapter moves (also q_proj / v_proj, whose gradient passes through the 4-bit o_proj), and both
    train what the reference trainer trains."""
    torch.set_num_threads(1)
    runs = {evals: trained[f"{name}-evals{evals}", 1] for evals in (EVALS, 0)}
    for proc, err, *_ in runs.values():
        assert proc.returncode == 0, err[-3000:]
    written = {evals: load_file(str(run[2] / "epoch1" / "adapter_model.safetensors")) for evals, run in runs.items()}
    assert set(written[EVALS]) == set(written[0])
    for key, tensor in written[EVALS].items():
        assert torch.equal(tensor, written[0][key]), key
        if "_B" in key:  # zero at the start
            assert tensor.abs().max() > 0, key
    assert [metrics(runs[EVALS][2])[s]["train/loss"] for s in range(1, STEPS + 1)] == [
        metrics(runs[0][2])[s]["train/loss"] for s in range(1, STEPS + 1)
    ]
    out, prepared = runs[EVALS][2], runs[EVALS][3]
    ref = reference_training(out.parent.parent / f"cfg-{name}-evals{EVALS}-1.toml", prepared, tmp_path, False)
    assert_trains_like(metrics(out), written[EVALS], ref, TOLERANCE["bf16"], name)


# What each deliberate bug moves a 4-bit run by (measured on an AVX2-only CPU before the reference's LM head
# followed cap's): adapters kept in bf16 ≈ 5.4% of a tensor's norm, nf4 without double quantization ≈ 5.0%,
# the adapter scale ×1.1 a few percent of the update.
BUGS = {
    "bf16-adapters": reference.Bugs(bf16_adapters=True),
    "single-quant-nf4": reference.Bugs(single_quant=True),
    "scale-x1.1": reference.Bugs(scale=1.1),
}


@pytest.mark.parametrize("bug", BUGS)
@pytest.mark.parametrize("run", ["qlora", "qlora-qv-evals0", "control-4bit-writers-evals0"])
def test_the_4bit_comparisons_catch_injected_bugs(trained, tmp_path, run, bug):
    """The 4-bit comparisons are strict enough on the path without native bf16 (the -evals0 runs, emulated on
    any CPU) and on this CPU's own (qlora): a reference with the bug disagrees with what cap trained."""
    torch.set_num_threads(1)
    proc, err, out, prepared = trained[run, 1]
    assert proc.returncode == 0, err[-3000:]
    native = NATIVE_BF16 and run == "qlora"
    ref = reference_training(out.parent.parent / f"cfg-{run}-1.toml", prepared, tmp_path, native, BUGS[bug])
    written = load_file(str(out / "epoch1" / "adapter_model.safetensors"))
    with pytest.raises(AssertionError):
        assert_trains_like(metrics(out), written, ref, TOLERANCE["bf16"], bug)


@pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("DS_ACCELERATOR") != "cuda",
    reason="CUDA only: benchmarks/gpu_check.sh runs it with DS_ACCELERATOR=cuda",
)
@pytest.mark.parametrize("name", FOUR_BIT)
def test_4bit_training_on_cuda_equals_the_reference(tmp_path, tiny_model_dir, name):
    """On CUDA, the 4-bit runs with and without evals between their steps both train what the
    reference trainer (on CPU) trains, to bf16's resolution."""
    runs = {}
    for evals in (EVALS, 0):
        out = tmp_path / f"evals{evals}"
        keys = dict(max_steps=STEPS, evals_per_run=evals, warmup="rms_ratio", eval_fraction=0.15) | FOUR_BIT[name]
        keys |= dict(prepared_dir=str(tmp_path / "prepared"), output_dir=str(out))
        cfg = write_config(tmp_path, tiny_model_dir("llama"), **keys)
        runs[evals] = (cfg.rename(tmp_path / f"cfg-{evals}.toml"), out)
        run_train(runs[evals][0], 1)
    ref = reference_training(runs[EVALS][0], tmp_path / "prepared", tmp_path, native_bf16=True)  # bf16 head on CUDA
    for evals, (_, out) in runs.items():
        written = load_file(str(out / "epoch1" / "adapter_model.safetensors"))
        assert_trains_like(metrics(out), written, ref, TOLERANCE["bf16"], evals)


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
